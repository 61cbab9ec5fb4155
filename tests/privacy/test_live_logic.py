"""The pure pieces of privacy in live rounds: run settings, the SecAgg stage decision, what hub
and node agree on (weights, clip range, round config checks), and the 0005 migration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from gridswarm.config import ConfigError, RunConfig, parse_run_config
from gridswarm.db import Base
from gridswarm.hub.privacy import _history
from gridswarm.hub.secagg_stages import StageAction, StageProgress, decide_stage
from gridswarm.hub.server import alembic
from gridswarm.privacy.live import (
    check_round_config,
    clip_range,
    node_vector,
    session_name,
    sum_denominator,
    tokens_ref,
)
from gridswarm.privacy.secagg import SecAggError, make_config, simulate_round
from tests.conftest import tiny_run

SECAGG = {"secagg": {"neighbours": 2, "max_dropouts": 1}}


def cfg_with(**overrides) -> RunConfig:
    return parse_run_config(tiny_run(**overrides))


# ----------------------------------------------------------------------------- settings


def test_privacy_is_off_by_default_and_old_configs_still_load():
    cfg = parse_run_config(tiny_run())
    assert cfg.privacy.secagg is None and cfg.privacy.dp is None
    stored = cfg.model_dump(mode="json")
    stored.pop("privacy")  # a run created before this section existed
    assert RunConfig.model_validate(stored).privacy == cfg.privacy


def test_switches_and_tables_turn_privacy_on():
    cfg = cfg_with(privacy={"secagg": True, "dp": True}, round={"quorum": 3})
    assert cfg.privacy.secagg.neighbours == 10 and cfg.privacy.dp.noise == "central"
    cfg = cfg_with(privacy={"secagg": False, "dp": {"epsilon_budget": 4}})
    assert cfg.privacy.secagg is None and cfg.privacy.dp.epsilon_budget == 4


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"privacy": SECAGG, "round": {"quorum": 3, "aggregator": "median"}}, "round.aggregator"),
        ({"privacy": SECAGG, "round": {"quorum": 3, "aggregator": "krum"}}, "round.aggregator"),
        ({"privacy": {"dp": True}, "round": {"aggregator": "trimmed-mean"}}, "round.aggregator"),
        ({"privacy": {"dp": {"noise": "distributed"}}}, "privacy.dp.noise"),
        ({"privacy": SECAGG, "round": {"quorum": 1}}, "round.quorum"),
        ({"privacy": SECAGG, "round": {"quorum": 2}}, "privacy.secagg.max_dropouts"),
        ({"privacy": {"secagg": {"neighbours": 3}}, "round": {"quorum": 3}}, "neighbours"),
        ({"privacy": {"secagg": {"neighbours": 4, "max_dropouts": 3}}}, "max_dropouts"),
        ({"privacy": {"dp": {"delta": 1.5}}}, "privacy.dp.delta"),
        ({"privacy": {"dp": {"noise": "local"}}}, "privacy.dp.noise"),
        (
            {"privacy": {"secagg": True}, "comm": {"error_feedback": True}, "round": {"quorum": 3}},
            "comm.error_feedback",
        ),
    ],
)
def test_incoherent_privacy_settings_are_refused_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as refused:
        parse_run_config(tiny_run(**overrides))
    assert field in str(refused.value)


# ----------------------------------------------------------------------------- stage decision


def progress(answered, expected="abcd", lost="", deadline_at=100.0, stage="mask", t=1):
    return StageProgress(
        stage=stage,
        n_nodes=4,
        max_dropouts=t,
        expected=frozenset(expected),
        answered=frozenset(answered),
        lost=frozenset(lost),
        deadline_at=deadline_at,
    )


def test_stage_advances_when_everyone_answered_and_waits_otherwise():
    assert decide_stage(progress("abcd"), 0.0) == (StageAction.ADVANCE, None)
    assert decide_stage(progress("abc"), 0.0) == (StageAction.WAIT, None)


def test_stage_advances_without_up_to_t_nodes_once_they_are_lost_or_late():
    assert decide_stage(progress("abc", lost="d"), 0.0)[0] is StageAction.ADVANCE
    assert decide_stage(progress("abc"), 100.0)[0] is StageAction.ADVANCE
    # a node missing since an earlier stage counts against t too
    assert decide_stage(progress("abc", expected="abc"), 0.0)[0] is StageAction.ADVANCE


def test_stage_fails_as_soon_as_more_than_t_nodes_are_gone():
    action, reason = decide_stage(progress("ab", lost="cd"), 0.0)
    assert action is StageAction.FAIL
    assert "2 of 4 nodes" in reason and "max_dropouts = 1" in reason and "mask" in reason
    assert decide_stage(progress("ab", expected="abc"), 0.0)[0] is StageAction.WAIT
    assert decide_stage(progress("ab", expected="abc", lost="c"), 0.0)[0] is StageAction.FAIL
    assert decide_stage(progress("ab"), 100.0)[0] is StageAction.FAIL


# ----------------------------------------------------------------------------- hub and node agree


def test_weighted_vectors_through_secagg_give_the_token_weighted_mean():
    cfg = cfg_with(privacy=SECAGG, round={"quorum": 3})
    gen = torch.Generator().manual_seed(0)
    ids = ["a", "b", "c", "d"]
    updates = {n: 0.05 * torch.randn(300, generator=gen) for n in ids}
    tokens = {"a": tokens_ref(cfg), "b": tokens_ref(cfg) // 2, "c": 256, "d": 512}
    config = make_config(session_name("r", 0, 0), ids, 300, 2, 1, clip_range(cfg, 4))
    vectors = {n: node_vector(cfg, updates[n], tokens[n], 4) for n in ids}
    result = simulate_round(config, vectors)
    mean = result.total / sum_denominator(cfg, list(tokens.values()), 4)
    w = torch.tensor([float(tokens[n]) for n in ids])
    expected = (w[:, None] * torch.stack([updates[n] for n in ids])).sum(0) / w.sum()
    assert float((mean - expected).abs().max()) < 1e-7


def test_dp_vectors_are_clipped_and_distributed_noise_is_sized_for_n_minus_t():
    cfg = cfg_with(
        privacy={**SECAGG, "dp": {"noise": "distributed", "clip_norm": 1.0}}, round={"quorum": 3}
    )
    update = torch.full((10_000,), 0.1)  # norm 10
    noisy = node_vector(cfg, update, 1, 4, torch.Generator().manual_seed(1))
    # clipped to norm 1 (0.01 per coordinate) plus N(0, (z C)^2 / (4 - 1))
    assert float(noisy.mean()) == pytest.approx(0.01, abs=0.02)
    assert float(noisy.std()) == pytest.approx(1 / 3**0.5, rel=0.05)
    assert clip_range(cfg, 4) == pytest.approx(1 + 6 / 3**0.5)
    central = cfg_with(privacy={**SECAGG, "dp": True}, round={"quorum": 3})
    assert float(node_vector(central, update, 1, 4).norm()) == pytest.approx(1.0, rel=1e-4)
    assert sum_denominator(central, [1, 2, 3], 4) == 4.0


def test_node_refuses_a_round_config_that_weakens_secagg():
    cfg = cfg_with(privacy=SECAGG, round={"quorum": 3})
    ids = ["a", "b", "c", "d"]
    good = make_config(session_name("run", 2, 1), ids, 50, 2, 1, clip_range(cfg, 4))
    check_round_config(good, cfg, "run", 2, 1, "a", 50)
    for bad, what in (
        (make_config(session_name("run", 2, 0), ids, 50, 2, 1, 1.0), "session"),
        (make_config(session_name("run", 2, 1), ids, 50, 4, 1, 1.0), "n_neighbours"),
        (make_config(session_name("run", 2, 1), ids, 50, 4, 0, 1.0), "max_dropouts"),
        (make_config(session_name("run", 2, 1), ids, 50, 2, 1, 8.0), "clip_range"),
        (make_config(session_name("run", 2, 1), ids[1:], 50, 2, 1, 1.0), "not a participant"),
        (make_config(session_name("run", 2, 1), ids[:2], 50, 2, 0, 1.0), "quorum"),
    ):
        with pytest.raises(SecAggError, match=what):
            check_round_config(bad, cfg, "run", 2, 1, "a", 50)


def test_accounting_history_merges_repeated_settings():
    class Row:
        def __init__(self, z: float, q: float) -> None:
            self.noise_multiplier, self.sample_rate = z, q

    rows = [Row(1.0, 1.0), Row(1.0, 1.0), Row(2.0, 1.0), Row(1.0, 1.0)]
    assert _history(rows) == [(1.0, 1.0, 2), (2.0, 1.0, 1), (1.0, 1.0, 1)]


# ----------------------------------------------------------------------------- migration


def test_migration_0005_creates_the_privacy_tables_as_modelled(tmp_path: Path):
    engine = create_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    alembic(engine, "upgrade", "head")
    ours = {"privacy_rounds", "privacy_runs", "secagg_sessions", "secagg_messages"}
    assert ours <= set(inspect(engine).get_table_names())
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert [d for d in diffs if any(t in repr(d) for t in ours)] == []
    alembic(engine, "downgrade", "0004_trust")
    assert not ours & set(inspect(engine).get_table_names())
