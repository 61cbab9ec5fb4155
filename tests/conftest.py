"""Shared fixtures: tiny run settings, local swarms of real processes, a real PostgreSQL server."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from gridswarm.swarm import Swarm, free_port, local_postgres

torch.set_num_threads(1)
REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def tiny_run(**overrides: object) -> dict:
    """Run settings small enough for a swarm test to finish rounds in a second or two."""
    cfg: dict = {
        "name": "tiny",
        "seed": 7,
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32},
        "train": {"seq_len": 32, "batch_size": 8, "inner_steps": 20, "min_inner_steps": 2},
        "round": {"deadline_s": 30, "quorum": 1, "min_nodes": 1},
        "budget": {"rounds": 3},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            cfg.setdefault(section, {})[field] = value
        else:
            cfg[section] = value
    return cfg


@pytest.fixture
def make_swarm(tmp_path: Path) -> Iterator[Callable[..., Swarm]]:
    """Factory of local swarms; every process started is stopped (by pid) at teardown."""
    swarms: list[Swarm] = []

    def make(**kwargs: object) -> Swarm:
        swarm = Swarm(tmp_path / f"swarm{len(swarms)}", free_port(), **kwargs)
        swarm.workdir.mkdir(parents=True)
        swarms.append(swarm)
        return swarm

    yield make
    for swarm in swarms:
        swarm.stop()


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.2):
    """Poll `predicate` until it returns something truthy; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server in a temporary folder on a free loopback port."""
    with local_postgres() as url:
        yield url
