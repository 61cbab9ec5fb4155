from __future__ import annotations

import gzip
from pathlib import Path

import httpx
import numpy as np
import pytest

from gridswarm.energy.series import UniformSeries
from gridswarm.energy.signals import (
    G_PER_KWH_PER_LB_PER_MWH,
    ConstantSignal,
    ElectricityMapsSignal,
    GBCarbonIntensitySignal,
    SignalError,
    TraceSignal,
    WattTimeSignal,
    parse_time_s,
    signal_from_config,
)

T0 = parse_time_s("2024-05-21T10:00:00Z")


def write_lwa(path: Path) -> None:
    # 30-min steps, then 15-min steps, with a NaN: the GB file's shape
    rows = ["Time,Carbon Intensity"]
    rows += ["2020-01-01 00:00:00,100", "2020-01-01 00:30:00,200", "2020-01-01 01:00:00,"]
    rows += ["2020-01-01 01:30:00,400", "2020-01-01 01:45:00,500", "2020-01-01 02:00:00,600"]
    path.write_text("\n".join(rows) + "\n")


def test_lwa_trace_mixed_step_and_nan(tmp_path: Path):
    f = tmp_path / "lwa_xx_2020_ci.csv"
    write_lwa(f)
    sig = TraceSignal.from_csv(f, step_s=900)
    assert sig.region == "XX"
    s = sig.series
    t = parse_time_s("2020-01-01T00:00:00Z")
    assert s.start_s == t and s.step_s == 900
    assert sig.current(t).intensity_g_per_kwh == 100
    assert s.at(t + 900) == pytest.approx(150)  # interpolated between 100 and 200
    assert s.at(t + 3600) == pytest.approx(300)  # the NaN, interpolated between 200 and 400
    assert s.at(t + 6300) == pytest.approx(500)
    assert np.all(np.isfinite(s.values))


def test_eia_trace_with_offset_and_nan(tmp_path: Path):
    f = tmp_path / "eia930_2022_TEST.csv.gz"
    lines = ["timestamp,WND,SUN,WAT,OIL,NG,COL,NUC,OTH,avg_CI"]
    for h, v in enumerate([400, 420, "", 460]):
        lines.append(f"2022-01-01 {h:02d}:00:00+00:00,1,1,1,0,1,1,1,0,{v}")
    with gzip.open(f, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    sig = TraceSignal.from_csv(f, step_s=3600)
    assert sig.region == "TEST"
    t = parse_time_s("2022-01-01T00:00:00Z")
    assert [sig.series.at(t + 3600 * h) for h in range(4)] == pytest.approx([400, 420, 440, 460])


def test_unknown_trace_format(tmp_path: Path):
    f = tmp_path / "x.csv"
    f.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="unknown trace format"):
        TraceSignal.from_csv(f)
    with pytest.raises(ValueError, match="not found"):
        TraceSignal.from_csv(tmp_path / "missing.csv")


def test_shipped_traces_load_and_replay(energy_data: Path):
    ci = energy_data / "carbon_intensity"
    gb = TraceSignal.from_csv(ci / "lwa_gb_2020_ci.csv.gz")
    assert gb.region == "GB" and gb.series.step_s == 900
    assert 150 < gb.series.values.mean() < 280  # README: mean 213
    eia = TraceSignal.from_csv(ci / "eia930_2022_PJM.csv.gz", step_s=3600)
    assert eia.region == "PJM" and len(eia.series.values) == 8760  # 23 NaN filled
    # replay the 2020 trace from 2031-03-03: same value 1 h into both
    sim0 = parse_time_s("2031-03-03T00:00:00Z")
    trace0 = parse_time_s("2020-03-02T00:00:00Z")
    moved = TraceSignal.from_csv(
        ci / "lwa_de_2020_ci.csv.gz", replay_at_s=sim0, trace_from_s=trace0
    )
    de = TraceSignal.from_csv(ci / "lwa_de_2020_ci.csv.gz")
    assert (
        moved.current(sim0 + 3600).intensity_g_per_kwh
        == de.current(trace0 + 3600).intensity_g_per_kwh
    )


def test_series_loop_window_and_mean():
    s = UniformSeries(0.0, 10.0, np.array([1.0, 2.0, 3.0]))
    assert s.at(35.0) == 1.0  # wraps
    assert s.window(5.0, 25.0) == [(5.0, 1.0), (10.0, 2.0), (20.0, 3.0)]
    assert s.mean_between(0.0, 30.0) == pytest.approx(2.0)
    assert s.mean_between(5.0, 15.0) == pytest.approx(1.5)
    clamped = UniformSeries(0.0, 10.0, np.array([1.0, 2.0]), loop=False)
    assert clamped.at(100.0) == 2.0 and clamped.at(-5) == 1.0
    with pytest.raises(ValueError, match="NaN"):
        UniformSeries(0.0, 1.0, np.array([1.0, np.nan]))


def test_trace_forecast_perfect_and_noisy():
    series = UniformSeries(0.0, 900.0, np.arange(100, 200, dtype=float))
    perfect = TraceSignal(series, "R")
    fc = perfect.forecast(450.0, 3600.0)
    assert fc[0].t_s == 450.0 and fc[0].intensity_g_per_kwh == 100
    assert [p.intensity_g_per_kwh for p in fc] == [100, 101, 102, 103, 104]
    noisy = TraceSignal(series, "R", forecast_error=0.2, seed=3)
    a = noisy.intensity_forecast(0.0, 86400.0)
    b = TraceSignal(series, "R", forecast_error=0.2, seed=3).intensity_forecast(0.0, 86400.0)
    c = TraceSignal(series, "R", forecast_error=0.2, seed=4).intensity_forecast(0.0, 86400.0)
    assert a == b and a != c  # seeded, reproducible
    assert a[0][1] == 100  # no error at lead time 0
    errors = [v / series.at(t) - 1 for t, v in a[1:]]
    assert 0.02 < float(np.std(errors)) < 0.3
    assert noisy.current(0.0).intensity_g_per_kwh == 100  # current is a measurement


def test_constant_signal():
    s = ConstantSignal("FR", 56.0, price_per_kwh=0.2)
    assert s.current(5.0).intensity_g_per_kwh == 56.0 and s.current(5.0).price_per_kwh == 0.2
    assert s.intensity_forecast(5.0, 3600) == [(5.0, 56.0)]
    with pytest.raises(ValueError, match="intensity_g_per_kwh"):
        ConstantSignal("FR", -1)


def test_electricitymaps_client(recorded_api):
    hdr = {"auth-token": "tok"}
    recorded_api.route("/v3/carbon-intensity/latest", "electricitymaps_latest.json", headers=hdr)
    recorded_api.route(
        "/v3/carbon-intensity/forecast", "electricitymaps_forecast.json", headers=hdr
    )
    recorded_api.route(
        "/v3/price-day-ahead/latest", "electricitymaps_price_latest.json", headers=hdr
    )
    with httpx.Client() as client:
        sig = ElectricityMapsSignal(
            "DE", "tok", base_url=recorded_api.base_url, client=client, with_price=True
        )
        now = sig.current(T0)
        assert now.intensity_g_per_kwh == 302 and now.t_s == T0
        assert now.price_per_kwh == pytest.approx(0.08425)
        fc = sig.forecast(T0 + 1800, 4 * 3600)
        assert [p.intensity_g_per_kwh for p in fc] == [302, 285, 261, 248, 259]
        assert fc[0].t_s == T0 + 1800
        sig.forecast(T0 + 2000, 3600)  # cached: no new request
        forecast_calls = [r for r in recorded_api.requests if r["path"].endswith("forecast")]
        assert len(forecast_calls) == 1
        assert forecast_calls[0]["query"] == {"zone": "DE", "horizonHours": "24"}
        bad = ElectricityMapsSignal("DE", "wrong", base_url=recorded_api.base_url, client=client)
        with pytest.raises(SignalError, match="HTTP 401"):
            bad.current(T0)


def test_watttime_client_logs_in_and_converts_units(recorded_api):
    token = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.recorded-fixture-token.sig"
    basic = {"Authorization": "Basic dXNlcjpwdw=="}  # user:pw
    recorded_api.route("/login", "watttime_login.json", headers=basic)
    bearer = {"Authorization": f"Bearer {token}"}
    recorded_api.route("/v3/forecast", "watttime_forecast.json", headers=bearer)
    with httpx.Client() as client:
        sig = WattTimeSignal(
            "CAISO_NORTH", "user", "pw", base_url=recorded_api.base_url, client=client
        )
        now = sig.current(T0 + 60)
        assert now.intensity_g_per_kwh == pytest.approx(1012.3 * G_PER_KWH_PER_LB_PER_MWH)
        fc = sig.forecast(T0, 1800)
        assert len(fc) == 6 and fc[3].intensity_g_per_kwh == pytest.approx(290.3, abs=0.1)
        q = next(r for r in recorded_api.requests if r["path"] == "/v3/forecast")["query"]
        assert q["region"] == "CAISO_NORTH" and q["signal_type"] == "co2_moer"
        bad = WattTimeSignal(
            "CAISO_NORTH", "user", "nope", base_url=recorded_api.base_url, client=client
        )
        with pytest.raises(SignalError, match="HTTP 401"):
            bad.current(T0)


def test_gb_client_national_and_regional(recorded_api):
    start = "2024-05-21T10:00Z"
    recorded_api.route("/intensity", "gb_intensity.json")
    recorded_api.route(f"/intensity/{start}/fw48h", "gb_fw48h.json")
    recorded_api.route("/regional/regionid/13", "gb_regional_current.json")
    recorded_api.route(f"/regional/intensity/{start}/fw48h/regionid/13", "gb_regional_fw48h.json")
    with httpx.Client() as client:
        national = GBCarbonIntensitySignal(base_url=recorded_api.base_url, client=client)
        assert national.current(T0).intensity_g_per_kwh == 118  # actual preferred
        fc = national.forecast(T0, 3 * 3600)
        assert [p.intensity_g_per_kwh for p in fc] == [118, 115, 104, 98, 95, 101]
        london = GBCarbonIntensitySignal(regionid=13, base_url=recorded_api.base_url, client=client)
        assert london.region == "GB-13"
        assert london.current(T0).intensity_g_per_kwh == 143
        assert [v for _, v in london.intensity_forecast(T0, 7200)] == [143, 131, 117]
        recorded_api.routes.pop("/intensity")
        with pytest.raises(SignalError, match="HTTP 404"):
            national.current(T0)


def test_signal_from_config(tmp_path: Path):
    f = tmp_path / "lwa_de_2020_ci.csv"
    write_lwa(f)
    sig = signal_from_config(
        {
            "kind": "trace",
            "path": f.name,
            "replay_at": "2030-01-01T00:00:00Z",
            "forecast_error": 0.1,
            "seed": 2,
        },
        region="DE",
        base_dir=tmp_path,
    )
    assert isinstance(sig, TraceSignal) and sig.region == "DE" and sig.forecast_error == 0.1
    assert sig.current(parse_time_s("2030-01-01T00:00:00Z")).intensity_g_per_kwh == 100
    const = signal_from_config({"kind": "constant", "intensity_g_per_kwh": 56}, region="FR")
    assert const.current(0).intensity_g_per_kwh == 56
    em = signal_from_config(
        {"kind": "electricitymaps"}, region="DE", env={"ELECTRICITYMAPS_TOKEN": "t"}
    )
    assert isinstance(em, ElectricityMapsSignal) and em.region == "DE"
    wt = signal_from_config(
        {"kind": "watttime", "region": "CAISO_NORTH"},
        env={"WATTTIME_USERNAME": "u", "WATTTIME_PASSWORD": "p"},
    )
    assert isinstance(wt, WattTimeSignal)
    gb = signal_from_config({"kind": "gb", "regionid": 13})
    assert gb.region == "GB-13"


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"kind": "tracee"}, "energy.signal.kind"),
        ({"kind": "trace"}, "energy.signal.path"),
        ({"kind": "trace", "path": "x", "pth": 1}, r"energy\.signal\.pth: Extra inputs"),
        ({"kind": "constant"}, "energy.signal.intensity_g_per_kwh"),
        ({"kind": "constant", "intensity_g_per_kwh": "high"}, "valid number"),
        ({"kind": "constant", "region": "FR", "intensity_g_per_kwh": 1e400}, "finite number"),
        ({"kind": "gb", "regionid": 99}, r"energy\.signal\.regionid: .* less than or equal to 17"),
        ({"kind": "electricitymaps"}, "energy.signal.token_env"),
        ({"kind": "watttime", "region": "X"}, "energy.signal.username_env"),
        ({"kind": "gb", "regionid": "london"}, "energy.signal.regionid"),
        ({"kind": "trace", "path": "lwa_de_2020_ci.csv", "replay_at": "soon"}, "replay_at"),
    ],
)
def test_signal_config_errors_name_the_field(tmp_path: Path, cfg, match):
    write_lwa(tmp_path / "lwa_de_2020_ci.csv")
    with pytest.raises(ValueError, match=match):
        signal_from_config(cfg, region="DE", base_dir=tmp_path, env={})
