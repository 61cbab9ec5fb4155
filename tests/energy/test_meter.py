from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from gridswarm.energy.meter import (
    DEFAULT_W_PER_CORE,
    MEMORY_W_PER_GB,
    EnergyMeter,
    ModelSource,
    NvmlSource,
    RaplSource,
    counter_delta_uj,
    lookup_cpu_power,
    mean_power_w,
    read_cpu_model,
)


def test_counter_delta_handles_wrap():
    assert counter_delta_uj(100, 350, 1000) == 250
    assert counter_delta_uj(900, 50, 1000) == 150  # wrapped once
    with pytest.raises(ValueError, match="backwards"):
        counter_delta_uj(900, 50, 0)


def test_cpu_table_lookup():
    w, why = lookup_cpu_power("AMD EPYC 7B13 64-Core Processor")
    assert w == 4.4 and "EPYC" in why
    w, why = lookup_cpu_power("12th Gen Intel(R) Core(TM) i7-12700")
    assert w == 5.4
    w, why = lookup_cpu_power("Mystery CPU 9000")
    assert w == DEFAULT_W_PER_CORE and "default" in why


def test_read_cpu_model(tmp_path: Path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n")
    assert read_cpu_model(f) == "AMD EPYC"
    assert read_cpu_model(tmp_path / "missing") == "unknown"


def make_zone(root: Path, name: str, label: str, energy_uj: int, max_uj: int) -> Path:
    z = root / name
    z.mkdir(parents=True)
    (z / "name").write_text(label + "\n")
    (z / "energy_uj").write_text(f"{energy_uj}\n")
    (z / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return z


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_rapl_fake_sysfs_with_wraparound(tmp_path: Path):
    pkg0 = make_zone(tmp_path, "intel-rapl:0", "package-0", 262_000_000_000, 262_143_328_850)
    pkg1 = make_zone(tmp_path, "intel-rapl:1", "package-1", 1_000_000, 262_143_328_850)
    dram = make_zone(tmp_path, "intel-rapl:0:0", "dram", 5_000_000, 65_712_999_613)
    make_zone(tmp_path, "intel-rapl:0:1", "core", 7, 100)  # inside the package: skipped
    make_zone(tmp_path, "intel-rapl:2", "psys", 7, 100)  # overlaps packages: skipped
    make_zone(tmp_path, "intel-rapl-mmio:0", "package-0", 7, 100)  # duplicate: skipped
    clock = FakeClock()
    meter = EnergyMeter.detect(powercap_root=tmp_path, use_nvml=False, clock=clock)
    assert meter.method == "rapl"
    assert {z.name for z in meter.sources[0].zones} == {"package-0", "package-1", "dram"}
    with meter.measure() as m:
        # package-0 wraps: 262_000 J -> past the 262_143.33 J range -> 56.67 J after the wrap
        (pkg0 / "energy_uj").write_text(f"{56_671_150}\n")
        (pkg1 / "energy_uj").write_text(f"{1_000_000 + 100_000_000}\n")  # +100 J
        (dram / "energy_uj").write_text(f"{5_000_000 + 20_000_000}\n")  # +20 J
        clock.t += 10.0
    wrapped_j = (262_143_328_850 - 262_000_000_000 + 56_671_150) / 1e6
    expected_wh = (wrapped_j + 100.0 + 20.0) / 3600.0
    assert m.reading.energy_wh == pytest.approx(expected_wh)
    assert m.reading.power_w == pytest.approx(expected_wh * 3600 / 10.0)
    assert m.reading.duration_s == 10.0
    assert m.reading.method == "rapl"
    assert "whole package" in m.reading.assumptions


def test_rapl_poll_catches_two_wraps(tmp_path: Path):
    z = make_zone(tmp_path, "intel-rapl:0", "package-0", 900, 1000)
    meter = EnergyMeter([RaplSource.discover(tmp_path)], clock=FakeClock())
    m = meter.start()
    (z / "energy_uj").write_text("100\n")  # wrap 1: +200
    m.poll()
    (z / "energy_uj").write_text("50\n")  # wrap 2: +950
    reading = m.finish()
    assert reading.energy_wh == pytest.approx(1150e-6 / 3600)


def test_rapl_unreadable_falls_back_to_model(tmp_path: Path):
    z = make_zone(tmp_path, "intel-rapl:0", "package-0", 1, 10)
    if os.geteuid() == 0:
        (z / "energy_uj").unlink()  # root reads anything: emulate "unreadable" by absence
    else:
        (z / "energy_uj").chmod(0)  # what Linux >= 5.10 does for non-root
    meter = EnergyMeter.detect(powercap_root=tmp_path, use_nvml=False, cpu_model="AMD EPYC")
    assert meter.method == "model"
    assert EnergyMeter.detect(powercap_root=tmp_path / "none", use_nvml=False).method == "model"


class FakeNvmlError(Exception):
    pass


class FakeNvml:
    """Stands in for pynvml: the outside world (an NVIDIA driver) we cannot reach here."""

    def __init__(self, energies_mj: list[int], names: list[str], supported: bool = True) -> None:
        self.energies_mj = list(energies_mj)
        self.names = names
        self.supported = supported
        self.initialised = False

    def nvmlInit(self) -> None:
        self.initialised = True

    def nvmlDeviceGetCount(self) -> int:
        return len(self.energies_mj)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        assert self.initialised
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return self.names[h].encode()

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> int:
        if not self.supported:
            raise FakeNvmlError("NVML_ERROR_NOT_SUPPORTED")
        return self.energies_mj[h]


def test_nvml_fake_module(tmp_path: Path):
    nvml = FakeNvml([1_000_000, 5_000], ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"])
    clock = FakeClock()
    meter = EnergyMeter.detect(
        powercap_root=tmp_path,
        nvml=nvml,
        cpu_model="AMD EPYC",
        clock=clock,
        w_per_core=1e-9,
        memory_w_per_gb=0.0,
    )
    assert meter.method == "model+nvml"
    with meter.measure() as m:
        nvml.energies_mj[0] += 360_000  # 360 J
        nvml.energies_mj[1] += 3_600_000  # 3600 J
        clock.t += 36.0
    assert m.reading.parts_wh["nvml"] == pytest.approx((360 + 3600) / 3600)
    assert m.reading.power_w == pytest.approx(m.reading.energy_wh * 3600 / 36.0)
    assert "H100" in meter.describe()


def test_nvml_unsupported_or_absent_is_skipped():
    assert NvmlSource.discover(FakeNvml([1], ["Tesla K80"], supported=False)) is None
    assert NvmlSource.discover(FakeNvml([], [])) is None


def test_model_energy_exact_with_injected_readers():
    state = {"t": 0.0, "cpu": 0.0, "rss": 2e9}
    src = ModelSource(
        cpu_model="AMD EPYC 7763",
        cpu_seconds=lambda: state["cpu"],
        rss_bytes=lambda: state["rss"],
        clock=lambda: state["t"],
    )
    meter = EnergyMeter([src], clock=lambda: state["t"])
    with meter.measure() as m:
        state["t"] = 100.0
        state["cpu"] = 150.0  # 1.5 busy cores
        state["rss"] = 4e9  # mean 3 GB
    expected_j = 150.0 * 4.4 + 3.0 * MEMORY_W_PER_GB * 100.0
    assert m.reading.energy_wh == pytest.approx(expected_j / 3600)
    assert m.reading.power_w == pytest.approx(expected_j / 100.0)
    assert m.reading.method == "model"
    text = meter.describe()
    assert "4.4 W/core" in text and "AMD EPYC 7763" in text and "excludes idle" in text


def test_model_path_on_this_machine_measures_busy_work():
    meter = EnergyMeter.detect(powercap_root="/nonexistent", use_nvml=False)
    assert meter.method == "model"
    with meter.measure() as m:
        deadline = time.monotonic() + 0.3
        x = 0
        while time.monotonic() < deadline:
            x += 1
    r = m.reading
    src = meter.sources[0]
    busy_cores = (r.energy_wh * 3600 - 0) / (src.w_per_core * r.duration_s)
    assert 0.25 < r.duration_s < 2.0
    assert r.energy_wh > 0 and r.power_w > 0
    assert busy_cores > 0.2  # a busy loop keeps (most of) one core busy
    assert r.power_w == pytest.approx(mean_power_w(r.energy_wh, r.duration_s))


def test_invalid_inputs():
    with pytest.raises(ValueError, match="w_per_core"):
        ModelSource(cpu_model="x", w_per_core=0)
    with pytest.raises(ValueError, match="at least one"):
        EnergyMeter([])
