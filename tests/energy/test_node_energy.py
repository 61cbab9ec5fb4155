"""The node's energy side (node/energy.py) against a clock the test controls: settings, the pause
/resume gate and what it tells the hub, forecasts, and metering with a PV/battery site."""

from __future__ import annotations

import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

from gridswarm.energy.meter import EnergyMeter
from gridswarm.node.energy import (
    REPORT_POINTS,
    NodeEnergy,
    load_node_energy,
    parse_node_energy,
)
from gridswarm.protocol import EnergyReport

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "energy"


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def settings(**energy):
    return parse_node_energy({"energy": energy})


def test_settings_errors_name_the_field():
    with pytest.raises(ValueError, match=r"the file needs an \[energy\] table"):
        parse_node_energy({})
    with pytest.raises(ValueError, match=r"energy\.regoin: Extra inputs are not permitted"):
        settings(regoin="DE")
    with pytest.raises(
        ValueError, match=r"energy\.pv: kind must be one of constant, pvlib, measured"
    ):
        settings(pv={"kind": "sunshine"})
    with pytest.raises(
        ValueError, match=r"energy\.household: kind must be one of constant, citylearn"
    ):
        settings(household={"kind": "pvlib", "kwp": 1})
    with pytest.raises(ValueError, match=r"energy\.battery\.capacity_wh: Field required"):
        settings(battery={"max_power_w": 100})
    with pytest.raises(ValueError, match=r"energy\.policy\.max_intensity: Extra inputs"):
        settings(policy={"max_intensity": 100})
    with pytest.raises(ValueError, match=r"energy\.signal\.intensity_g_per_kwh: Field required"):
        settings(region="FR", signal={"kind": "constant"})
    with pytest.raises(
        ValueError, match=r"energy\.forecast_step_s: .* greater than or equal to 0\.1"
    ):
        settings(forecast_step_s=0)
    with pytest.raises(ValueError, match=r"energy\.draw_w: Input should be a finite number"):
        settings(draw_w=float("inf"))
    with pytest.raises(ValueError, match=r"energy\.pv\.constant\.power_w: Input should be a valid"):
        settings(pv={"kind": "constant", "power_w": "5"})  # strict: no numbers from strings
    with pytest.raises(ValueError, match=r"energy\.battery\.soc_floor_frac: .* less than 1"):
        settings(battery={"capacity_wh": 5000, "max_power_w": 2500, "soc_floor_frac": 1.0})


def test_gate_pauses_outside_the_window_and_tells_the_hub_on_each_change():
    clock = Clock(at("2026-06-01T21:59:00"))  # a Monday, UTC
    node = NodeEnergy(
        settings(
            region="DE",
            signal={"kind": "constant", "intensity_g_per_kwh": 120},
            policy={"windows": ["22:00-06:00"]},
            report_every_s=600,
            forecast_step_s=900,
        ),
        clock=clock,
    )
    sent: list[EnergyReport] = []
    assert not node.gate("run1", sent.append).allowed  # 21:59: outside the window
    assert len(sent) == 1 and not sent[0].available and "outside time windows" in sent[0].reasons[0]
    # the availability forecast says when it opens: at the first grid point after 22:00
    opens = next(t for t, ok in sent[0].availability_forecast if ok)
    assert opens == clock.t + 900
    clock.t += 30
    assert not node.gate("run1", sent.append).allowed and len(sent) == 1  # no change: no report
    clock.t += 60  # 22:00:30
    assert node.gate("run1", sent.append).allowed and sent[-1].available and len(sent) == 2
    assert sent[-1].intensity_g_per_kwh == 120.0 and sent[-1].region == "DE"
    node.gate("run2", sent.append)  # a new run: the hub must know which run the node is on
    assert len(sent) == 3 and sent[-1].run_id == "run2"
    clock.t += 600  # stale: report again
    node.gate("run2", sent.append)
    assert len(sent) == 4

    def failing(_: EnergyReport) -> None:
        raise ConnectionError("hub restarting")

    clock.t = at("2026-06-02T06:00:00")  # the window closed; the hub is away
    assert not node.gate("run2", failing).allowed
    assert not node.gate("run2", sent.append).allowed and len(sent) == 5  # retried


def test_forecast_grid_is_bounded_and_follows_the_signal(tmp_path: Path):
    trace = tmp_path / "t.csv"
    trace.write_text(
        "Time,Carbon Intensity\n"
        + "".join(f"2020-01-01 {h:02d}:00:00,{100 + 10 * h}\n" for h in range(24))
    )
    node = NodeEnergy(
        settings(
            region="X",
            signal={"kind": "trace", "path": str(trace), "step_s": 3600, "replay_at": 0},
            forecast_horizon_s=7 * 86400,
            forecast_step_s=60,
            policy={"max_intensity_g_per_kwh": 200},
        ),
        clock=Clock(5 * 3600.0),  # 05:00 of the replayed day
    )
    report = node.report("r")
    assert len(report.intensity_forecast) <= REPORT_POINTS
    assert report.intensity_forecast[0] == (5 * 3600.0, 150.0)
    # the policy applied to the forecast: allowed below 200 g/kWh, i.e. before 10:00
    first_refusal = next(t for t, ok in report.availability_forecast if not ok)
    assert 10 * 3600 <= first_refusal < 10 * 3600 + 7 * 86400 / REPORT_POINTS + 1
    assert len(report.model_dump_json()) < 64 * 1024  # fits the hub's JSON limit


def busy(seconds: float) -> None:
    x = torch.ones(64, 64)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        x = x @ x / 64


def test_measure_meters_the_work_and_the_share_met_by_local_surplus():
    clock = Clock(at("2026-06-01T12:00:00"))
    sunny = NodeEnergy(
        settings(
            region="CISO",
            signal={"kind": "constant", "intensity_g_per_kwh": 250},
            pv={"kind": "constant", "power_w": 400},
            household={"kind": "constant", "power_w": 300},
        ),
        clock=clock,
    )
    before_w = sunny.draw_w  # the meter's nominal draw until something is measured
    with sunny.measure() as metered:
        busy(0.2)
        clock.t += 0.2
    use = metered.use
    assert use.reading.method == "model" and use.reading.energy_wh > 0
    assert 1.0 < use.reading.power_w < 20.0  # one busy core, 4.4-15 W/core in the table
    # 100 W of surplus covers the whole draw of one core
    assert use.local_surplus_share == 1.0 and use.intensity_g_per_kwh == 250.0
    meta = use.meta()
    assert meta["energy_method"] == "model" and meta["region"] == "CISO"
    assert sunny.draw_w == pytest.approx(0.5 * use.reading.power_w + 0.5 * before_w)

    dark = NodeEnergy(
        settings(
            region="CISO",
            pv={"kind": "constant", "power_w": 0},
            battery={"capacity_wh": 100, "max_power_w": 1000, "initial_soc_frac": 0.1},
        ),
        clock=clock,
    )
    with dark.measure() as metered:
        busy(0.1)
        clock.t += 0.1
    # no PV and the battery at its floor: all from the grid
    assert metered.use.local_surplus_share == 0.0 and metered.use.intensity_g_per_kwh is None


def test_surplus_policy_reads_battery_and_pv():
    clock = Clock(at("2026-06-01T12:00:00"))
    node = NodeEnergy(
        settings(
            region="X",
            pv={"kind": "constant", "power_w": 0},
            battery={"capacity_wh": 1000, "max_power_w": 500, "initial_soc_frac": 0.9},
            policy={"require_surplus": True, "battery_floor_frac": 0.5},
            draw_w=200,
        ),
        clock=clock,
    )
    assert node.decide().allowed  # 400 Wh above the floor: 500 W for 15 min
    report = node.report(None)
    assert report.battery_available_wh == pytest.approx(400 * 0.9**0.5)
    assert report.surplus_forecast_w[0] == (clock.t, 0.0)
    node.site.soc_wh = 520.0  # 20 Wh above the floor: 80 W for 15 min < 200 W
    decision = node.decide()
    assert not decision.allowed and "local supply 80 W" in decision.reasons[0]


def test_pvlib_clear_sky_pv_follows_the_sun():
    node = NodeEnergy(
        settings(
            region="DE",
            pv={
                "kind": "pvlib",
                "kwp": 4,
                "tilt_deg": 30,
                "azimuth_deg": 180,
                "lat": 52.5,
                "lon": 13.4,
            },
        ),
        clock=Clock(at("2026-06-21T11:00:00")),
    )
    noon, night = node.site.home.surplus_w([at("2026-06-21T11:00:00"), at("2026-06-21T23:00:00")])
    assert 2500 < noon < 4000 and night == 0.0


def test_nominal_draw_uses_the_meter_model():
    meter = EnergyMeter.detect(w_per_core=7.5)
    node = NodeEnergy(None, region="PJM", threads=2, meter=meter)
    assert node.draw_w == 15.0 and node.region == "PJM"
    assert "7.5 W/core" in node.describe() and "policy rules: none" in node.describe()
    assert node.gate(None, lambda r: None).allowed  # no policy: always runs


def test_the_example_files_parse(energy_data):
    for path in sorted(EXAMPLES.glob("*node.toml")):
        node = NodeEnergy(load_node_energy(path), clock=Clock(at("2026-06-01T12:00:00")))
        report = node.report("r")
        assert report.region and report.intensity_g_per_kwh is not None, path
    run = tomllib.loads((EXAMPLES / "greedy-run.toml").read_text())
    assert run["energy"]["policy"] == "greedy-green"
