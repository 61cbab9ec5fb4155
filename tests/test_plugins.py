"""Extension points: an aggregator, a codec, a carbon-signal kind and a hub energy policy added by
an installed plugin
(examples/plugin, found through its entry points), used without editing gridswarm."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest
import torch

from gridswarm.config import ConfigError, parse_run_config
from gridswarm.energy.policy import HUB_POLICIES, NodeEnergyState, plan_round
from gridswarm.energy.signals import SIGNALS, signal_from_config
from gridswarm.plugins import Registry, UnknownPlugin
from gridswarm.train.aggregate import AGGREGATORS, make_aggregator
from gridswarm.train.codecs import CODECS, make_codec
from tests.harness import GOLDEN_RUN, run_golden

PLUGIN = Path(__file__).resolve().parent.parent / "examples" / "plugin"
REGISTRIES = (AGGREGATORS, CODECS, SIGNALS, HUB_POLICIES)


def install_metadata(site: Path, entry_points: dict[str, dict[str, str]], name: str) -> None:
    """What `pip install` leaves for entry points: a dist-info folder with entry_points.txt."""
    dist = site / f"{name.replace('-', '_')}-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    lines = []
    for group, items in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{key} = {value}" for key, value in items.items()]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def plugin_installed(tmp_path, monkeypatch):
    """examples/plugin installed as pip would, with its entry points from its own pyproject."""
    project = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"]
    install_metadata(tmp_path / "site", project["entry-points"], project["name"])
    monkeypatch.syspath_prepend(str(PLUGIN / "src"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for registry in REGISTRIES:
        registry.reload()
    yield
    monkeypatch.undo()
    sys.modules.pop("gridswarm_example_plugin", None)
    for registry in REGISTRIES:
        registry.reload()


def test_unknown_names_are_refused_with_the_known_ones():
    with pytest.raises(UnknownPlugin, match=r"choose one of .*'mean'"):
        make_aggregator("norm-clipped-mean")
    with pytest.raises(ConfigError, match=r"comm\.codec.*unknown codec 'bf16'"):
        parse_run_config({"comm": {"codec": "bf16"}})
    with pytest.raises(ValueError, match=r"energy\.signal\.kind"):
        signal_from_config({"kind": "day-night"}, region="DE")
    with pytest.raises(ConfigError, match="unknown hub energy policy"):
        parse_run_config({"energy": {"policy": "energy-efficient", "deadline_s": 60}})


def test_plugins_are_found_through_entry_points(plugin_installed):
    assert "norm-clipped-mean" in AGGREGATORS.names()
    assert "bf16" in CODECS.names() and "day-night" in SIGNALS.names()
    rule = make_aggregator("norm-clipped-mean", factor=1.0)
    honest = torch.ones(3, 8)
    attacker = torch.full((1, 8), 1000.0)
    out = rule(torch.cat([honest, attacker]), torch.ones(4))
    assert out.abs().max() < 2.0  # the huge update was clipped to the median norm
    codec = make_codec("bf16")
    vec = torch.randn(1000)
    assert (codec.decode(codec.encode(vec), 1000) - vec).abs().max() < 0.02
    signal = signal_from_config(
        {"kind": "day-night", "day_g_per_kwh": 40, "night_g_per_kwh": 400}, region="ES"
    )
    noon, midnight = 12 * 3600.0, 0.0
    assert signal.current(noon).intensity_g_per_kwh == 40
    assert signal.current(midnight).intensity_g_per_kwh == 400
    assert signal.intensity_forecast(midnight, 86400)[0] == (midnight, 400)


def test_a_run_trains_with_plugin_aggregator_and_codec(plugin_installed, tmp_path):
    config = {
        **GOLDEN_RUN,
        "round": {**GOLDEN_RUN["round"], "aggregator": "norm-clipped-mean"},
        "comm": {"codec": "bf16", "codec_down": "bf16"},
        "budget": {"rounds": 2},
    }
    result = run_golden(tmp_path, config)
    assert result["status"] == "finished"
    assert result["val_loss"][-1] < result["val_loss"][0] - 0.3


def test_a_broken_plugin_is_left_out_and_the_rest_work(tmp_path, monkeypatch, caplog):
    install_metadata(
        tmp_path,
        {"gridswarm.test-broken": {"bad": "no_such_module:X", "good": "math:sqrt"}},
        "broken-plugin",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry: Registry = Registry("gridswarm.test-broken", "test thing")
    assert registry.names() == ["good"]
    assert "failed to load" in caplog.text


def test_a_plugin_cannot_replace_a_builtin():
    with pytest.raises(ValueError, match="built in"):
        AGGREGATORS.register("mean", object)


def test_a_plugin_energy_policy_plans_rounds(plugin_installed):
    cfg = parse_run_config(
        {
            "energy": {"policy": "energy-efficient", "deadline_s": 3600},
            "budget": {"rounds": None, "tokens": 10**6},
        }
    )
    assert cfg.energy.policy == "energy-efficient"
    nodes = [  # same speed, different draw: the frugal node alone keeps the pace
        NodeEnergyState("hungry", "DE", 100.0, 300.0, intensity_forecast=[(0.0, 20.0)]),
        NodeEnergyState("frugal", "DE", 100.0, 30.0, intensity_forecast=[(0.0, 500.0)]),
    ]
    plan = plan_round("energy-efficient", 0.0, nodes, 20_000, 3600.0, 60.0)
    assert plan.shares["frugal"] > 0 and plan.shares["hungry"] == 0
    green = plan_round("greedy-green", 0.0, nodes, 20_000, 3600.0, 60.0)
    assert green.shares["hungry"] > 0 and green.shares["frugal"] == 0  # carbon, not energy
