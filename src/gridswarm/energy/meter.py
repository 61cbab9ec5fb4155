"""Energy meter: how much energy did this piece of work use, and how do we know?

Three sources, each reading tagged with its method:

- ``rapl``: Linux powercap counters (``/sys/class/powercap/intel-rapl:*``; AMD uses the same tree).
  Whole CPU packages (+ DRAM subzones), not just this process. Counters wrap at
  ``max_energy_range_uj``; a wrap between two reads is undone, so poll once per wrap period.
- ``nvml``: NVIDIA GPU total-energy counters (``nvmlDeviceGetTotalEnergyConsumption``, mJ, Volta+).
  Whole GPUs, not just this process.
- ``model``: when no counter is readable (VMs, containers, non-root since Linux 5.10): CPU time of
  this process (and its waited-for children) × watts per busy core from a table of common CPUs, plus
  resident memory × watts per GB. Only the marginal draw of the work: idle, board, fans and PSU
  losses are not counted. ``describe()`` prints every assumption.

Usage::

    meter = EnergyMeter.detect()
    with meter.measure() as m:
        train()          # call m.poll() now and then in long runs (RAPL wrap)
    m.reading            # EnergyReading(energy_wh, power_w, duration_s, method, assumptions, parts)
"""

from __future__ import annotations

import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

J_PER_WH = 3600.0
GB = 1e9

# Watts per fully busy core: TDP / cores of a representative part, the Green Algorithms approach
# (Lannelongue et al., Adv. Sci. 2021). First matching substring wins (case-insensitive), so the
# more specific keys come first.
CPU_POWER_TABLE: tuple[tuple[str, float, str], ...] = (
    ("EPYC", 4.4, "AMD EPYC 7763: 280 W / 64 cores"),
    ("Threadripper", 4.4, "AMD Threadripper 3990X: 280 W / 64 cores"),
    ("Ryzen 9", 6.6, "AMD Ryzen 9 5950X: 105 W / 16 cores"),
    ("Ryzen 7", 8.1, "AMD Ryzen 7 7700: 65 W / 8 cores"),
    ("Ryzen 5", 10.8, "AMD Ryzen 5 5600X: 65 W / 6 cores"),
    ("Xeon", 7.5, "Intel Xeon Gold 6248: 150 W / 20 cores"),
    ("i9-", 7.8, "Intel Core i9-12900K: 125 W / 16 cores"),
    ("i7-", 5.4, "Intel Core i7-12700: 65 W / 12 cores"),
    ("i5-", 10.8, "Intel Core i5-12400: 65 W / 6 cores"),
    ("i3-", 15.0, "Intel Core i3-12100: 60 W / 4 cores"),
    ("Apple M", 2.5, "Apple M1: ~20 W / 8 cores"),
    ("Cortex-A72", 1.6, "Raspberry Pi 4 (BCM2711): ~6.4 W / 4 cores"),
)
DEFAULT_W_PER_CORE = 10.0  # unknown CPU: a desktop-class figure, errs high for servers
MEMORY_W_PER_GB = 0.3725  # Green Algorithms, after Micron DDR4 power calculators


# --------------------------------------------------------------------------------------------------
# pure helpers


def counter_delta_uj(start_uj: int, end_uj: int, max_range_uj: int) -> int:
    """Energy between two reads of a wrapping µJ counter (at most one wrap in between)."""
    if start_uj < 0 or end_uj < 0:
        raise ValueError(f"counter values must be >= 0, got {start_uj}, {end_uj}")
    if end_uj >= start_uj:
        return end_uj - start_uj
    if max_range_uj <= 0 or start_uj > max_range_uj:
        raise ValueError(
            f"counter went backwards ({start_uj} -> {end_uj}) and max_range_uj={max_range_uj} "
            "cannot explain a wrap"
        )
    return max_range_uj - start_uj + end_uj


def j_to_wh(energy_j: float) -> float:
    return energy_j / J_PER_WH


def mean_power_w(energy_wh: float, duration_s: float) -> float:
    """Mean power over an interval; 0 for an empty interval."""
    return energy_wh * J_PER_WH / duration_s if duration_s > 0 else 0.0


def model_energy_j(
    cpu_s: float, w_per_core: float, memory_gb: float, memory_w_per_gb: float, duration_s: float
) -> float:
    """Modelled energy: busy core-seconds × W/core + resident GB × W/GB × wall seconds."""
    if min(cpu_s, w_per_core, memory_gb, memory_w_per_gb, duration_s) < 0:
        raise ValueError("model inputs must be >= 0")
    return cpu_s * w_per_core + memory_gb * memory_w_per_gb * duration_s


def lookup_cpu_power(model_name: str) -> tuple[float, str]:
    """(W per busy core, why) for a CPU model string; DEFAULT_W_PER_CORE when none matches."""
    lowered = model_name.lower()
    for key, watts, source in CPU_POWER_TABLE:
        if key.lower() in lowered:
            return watts, f"{watts} W/core from table key {key!r} ({source})"
    return (
        DEFAULT_W_PER_CORE,
        f"{DEFAULT_W_PER_CORE} W/core default (CPU {model_name!r} not in table)",
    )


def read_cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The first 'model name' (x86) or 'Model'/'Hardware' (ARM) line; 'unknown' otherwise."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return "unknown"
    for key in ("model name", "Model", "Hardware", "cpu model"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
        if m:
            return m.group(1).strip()
    return "unknown"


# --------------------------------------------------------------------------------------------------
# readings and sources


@dataclass(frozen=True)
class EnergyReading:
    """Energy of one measured interval and how it was obtained."""

    energy_wh: float
    power_w: float
    duration_s: float
    method: str  # "rapl", "nvml", "model", or a "+"-join when several sources add up
    assumptions: str
    parts_wh: dict[str, float] = field(default_factory=dict)  # energy_wh per method


class EnergySource(ABC):
    """One way to read energy: take snapshots, convert a pair of snapshots to joules."""

    method: str

    @abstractmethod
    def snapshot(self) -> Any: ...

    @abstractmethod
    def energy_j(self, start: Any, end: Any) -> float: ...

    @abstractmethod
    def describe(self) -> str: ...


@dataclass(frozen=True)
class RaplZone:
    path: Path
    name: str
    max_energy_range_uj: int


class RaplSource(EnergySource):
    """Linux powercap RAPL zones under `root` (injectable: tests use a fake tree)."""

    method = "rapl"

    def __init__(self, zones: Sequence[RaplZone]) -> None:
        if not zones:
            raise ValueError("RaplSource needs at least one zone")
        self.zones = list(zones)

    @classmethod
    def discover(
        cls, root: str | Path = "/sys/class/powercap", *, include_dram: bool = True
    ) -> RaplSource | None:
        """Readable package zones (and DRAM subzones) under `root`, or None.

        `psys` (whole platform) is skipped because it overlaps the package zones; `intel-rapl-mmio`
        duplicates the package counter on recent Intel parts and is skipped too.
        """
        root = Path(root)
        if not root.is_dir():
            return None
        zones = []
        for entry in sorted(root.iterdir()):
            if not re.fullmatch(r"intel-rapl:\d+(:\d+)?", entry.name):
                continue
            try:
                name = (entry / "name").read_text().strip()
                int((entry / "energy_uj").read_text())
                max_range = int((entry / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                continue  # unreadable (root-only since Linux 5.10) or not a zone
            is_sub = entry.name.count(":") == 2
            if name.startswith("psys"):
                continue
            if is_sub and not (include_dram and name == "dram"):
                continue  # core/uncore are inside the package counter
            zones.append(RaplZone(entry, name, max_range))
        return cls(zones) if zones else None

    def snapshot(self) -> list[int]:
        return [int((z.path / "energy_uj").read_text()) for z in self.zones]

    def energy_j(self, start: list[int], end: list[int]) -> float:
        return 1e-6 * sum(
            counter_delta_uj(a, b, z.max_energy_range_uj)
            for a, b, z in zip(start, end, self.zones, strict=True)
        )

    def describe(self) -> str:
        names = ", ".join(f"{z.path.name} ({z.name})" for z in self.zones)
        return (
            f"rapl: powercap counters {names}; whole package(s), every process on them is counted; "
            "wraps undone via max_energy_range_uj"
        )


class NvmlSource(EnergySource):
    """NVIDIA GPU energy counters through an NVML module (pynvml from nvidia-ml-py, or a fake)."""

    method = "nvml"

    def __init__(self, nvml: ModuleType | Any, indices: Sequence[int]) -> None:
        self.nvml = nvml
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        self.names = []
        for h in self.handles:
            name = nvml.nvmlDeviceGetName(h)
            self.names.append(name.decode() if isinstance(name, bytes) else str(name))
        if not self.handles:
            raise ValueError("NvmlSource needs at least one GPU")

    @classmethod
    def discover(
        cls, nvml: ModuleType | Any | None = None, indices: Sequence[int] | None = None
    ) -> NvmlSource | None:
        """GPUs whose energy counter answers, or None (no module, no driver, no GPU, pre-Volta)."""
        if nvml is None:
            try:
                import pynvml as nvml  # nvidia-ml-py
            except ImportError:
                return None
        try:
            nvml.nvmlInit()
            count = nvml.nvmlDeviceGetCount()
            wanted = list(range(count)) if indices is None else list(indices)
            usable = []
            for i in wanted:
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
                usable.append(i)
        except Exception:  # NVMLError subclasses (no driver, unsupported, ...)
            return None
        return cls(nvml, usable) if usable else None

    def snapshot(self) -> list[int]:
        return [int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(h)) for h in self.handles]

    def energy_j(self, start: list[int], end: list[int]) -> float:
        deltas = [b - a for a, b in zip(start, end, strict=True)]
        if any(d < 0 for d in deltas):
            raise ValueError(f"NVML energy counter went backwards: {deltas} mJ (driver reload?)")
        return 1e-3 * sum(deltas)

    def describe(self) -> str:
        gpus = ", ".join(f"{i}:{n}" for i, n in enumerate(self.names))
        return f"nvml: total-energy counters of GPU(s) {gpus}; whole GPU, not per process"


def _process_cpu_s() -> float:
    """CPU seconds of this process (all threads, ns resolution) plus its reaped children.
    `os.times()` alone ticks at 10 ms, which reads a short training as nearly zero energy."""
    t = os.times()
    return time.process_time() + t.children_user + t.children_system


def _process_rss_bytes() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return float(pages * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        import resource

        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024.0


@dataclass(frozen=True)
class ModelSnapshot:
    t_s: float
    cpu_s: float
    rss_bytes: float


class ModelSource(EnergySource):
    """Utilisation model: process CPU seconds × W/core + resident GB × W/GB × wall seconds."""

    method = "model"

    def __init__(
        self,
        *,
        cpu_model: str | None = None,
        w_per_core: float | None = None,
        memory_w_per_gb: float = MEMORY_W_PER_GB,
        cpu_seconds: Callable[[], float] = _process_cpu_s,
        rss_bytes: Callable[[], float] = _process_rss_bytes,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cpu_model = cpu_model if cpu_model is not None else read_cpu_model()
        if w_per_core is None:
            self.w_per_core, self.w_per_core_source = lookup_cpu_power(self.cpu_model)
        else:
            if w_per_core <= 0:
                raise ValueError(f"w_per_core must be > 0, got {w_per_core}")
            self.w_per_core, self.w_per_core_source = w_per_core, f"{w_per_core} W/core (given)"
        if memory_w_per_gb < 0:
            raise ValueError(f"memory_w_per_gb must be >= 0, got {memory_w_per_gb}")
        self.memory_w_per_gb = memory_w_per_gb
        self.cpu_seconds = cpu_seconds
        self.rss_bytes = rss_bytes
        self.clock = clock

    def snapshot(self) -> ModelSnapshot:
        return ModelSnapshot(self.clock(), self.cpu_seconds(), self.rss_bytes())

    def energy_j(self, start: ModelSnapshot, end: ModelSnapshot) -> float:
        duration_s = max(end.t_s - start.t_s, 0.0)
        cpu_s = max(end.cpu_s - start.cpu_s, 0.0)
        memory_gb = 0.5 * (start.rss_bytes + end.rss_bytes) / GB
        return model_energy_j(cpu_s, self.w_per_core, memory_gb, self.memory_w_per_gb, duration_s)

    def describe(self) -> str:
        return (
            f"model: CPU {self.cpu_model!r} -> {self.w_per_core_source}; power = busy cores of "
            f"this process (CPU-seconds / wall-seconds, children included once reaped) × "
            f"{self.w_per_core} W + resident memory GB × {self.memory_w_per_gb} W/GB; "
            "excludes idle, board, fan and PSU power; no GPU"
        )


# --------------------------------------------------------------------------------------------------
# the meter


class Measurement:
    """An open measurement: `poll()` accumulates (keeps RAPL wraps at most one per interval),
    `reading` is set when the `measure()` block ends."""

    def __init__(self, meter: EnergyMeter) -> None:
        self.meter = meter
        self.t0_s = meter.clock()
        self._last = [s.snapshot() for s in meter.sources]
        self._energy_j = [0.0 for _ in meter.sources]
        self.reading: EnergyReading | None = None

    def poll(self) -> float:
        """Accumulate energy since the last poll; returns energy_wh so far."""
        now = [s.snapshot() for s in self.meter.sources]
        for i, (src, a, b) in enumerate(zip(self.meter.sources, self._last, now, strict=True)):
            self._energy_j[i] += src.energy_j(a, b)
        self._last = now
        return j_to_wh(sum(self._energy_j))

    def finish(self) -> EnergyReading:
        self.poll()
        duration_s = max(self.meter.clock() - self.t0_s, 0.0)
        parts = {
            s.method: j_to_wh(e) for s, e in zip(self.meter.sources, self._energy_j, strict=True)
        }
        energy_wh = sum(parts.values())
        self.reading = EnergyReading(
            energy_wh=energy_wh,
            power_w=mean_power_w(energy_wh, duration_s),
            duration_s=duration_s,
            method=self.meter.method,
            assumptions=self.meter.describe(),
            parts_wh=parts,
        )
        return self.reading


class EnergyMeter:
    """Sum of energy sources (CPU side: rapl or model; GPU side: nvml when present)."""

    def __init__(
        self, sources: Sequence[EnergySource], clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not sources:
            raise ValueError("EnergyMeter needs at least one source")
        methods = [s.method for s in sources]
        if len(set(methods)) != len(methods):
            raise ValueError(f"duplicate energy sources: {methods}")
        self.sources = list(sources)
        self.clock = clock

    @classmethod
    def detect(
        cls,
        *,
        powercap_root: str | Path = "/sys/class/powercap",
        nvml: ModuleType | Any | None = None,
        use_nvml: bool = True,
        gpu_indices: Sequence[int] | None = None,
        cpu_model: str | None = None,
        w_per_core: float | None = None,
        memory_w_per_gb: float = MEMORY_W_PER_GB,
        clock: Callable[[], float] = time.monotonic,
    ) -> EnergyMeter:
        """RAPL if readable, else the model, for the CPU; plus NVML when a GPU answers."""
        cpu: EnergySource | None = RaplSource.discover(powercap_root)
        if cpu is None:
            cpu = ModelSource(
                cpu_model=cpu_model,
                w_per_core=w_per_core,
                memory_w_per_gb=memory_w_per_gb,
                clock=clock,
            )
        sources = [cpu]
        if use_nvml:
            gpu = NvmlSource.discover(nvml, gpu_indices)
            if gpu is not None:
                sources.append(gpu)
        return cls(sources, clock)

    @property
    def method(self) -> str:
        return "+".join(s.method for s in self.sources)

    def describe(self) -> str:
        return "\n".join(s.describe() for s in self.sources)

    def start(self) -> Measurement:
        return Measurement(self)

    @contextmanager
    def measure(self) -> Iterator[Measurement]:
        m = Measurement(self)
        try:
            yield m
        finally:
            m.finish()
