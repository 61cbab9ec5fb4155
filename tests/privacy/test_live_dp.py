"""DP-FedAvg on a real swarm: the hub clips and noises each round, the Opacus accountant's
epsilon is stored per round and shown in the run status, and the run finishes before a round
that would pass its epsilon budget."""

from __future__ import annotations

import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from gridswarm.config import RunConfig
from gridswarm.hub import models as m
from gridswarm.hub.server import make_engine
from gridswarm.identity import Identity
from gridswarm.node.client import HubClient, HubRequestError
from gridswarm.privacy.dp import clip_updates, epsilon_for
from gridswarm.train.params import unpack_vector
from gridswarm.train.workload import Workload
from tests.conftest import tiny_run, wait_for

pytestmark = pytest.mark.slow
DP = {"clip_norm": 0.5, "noise_multiplier": 1.0, "delta": 1e-5, "epsilon_budget": 8.0}


def test_central_dp_run_accounts_epsilon_and_stops_at_its_budget(make_swarm):
    swarm = make_swarm()
    swarm.start_hub()
    sponsor = HubClient(swarm.url, Identity.generate(), retry_for_s=30)
    # A budget below one round's epsilon, or a robust rule under DP, is refused up front.
    for bad, field in (
        (tiny_run(privacy={"dp": DP | {"epsilon_budget": 3.0}}), "privacy.dp.epsilon_budget"),
        (tiny_run(privacy={"dp": DP}, round={"aggregator": "median"}), "round.aggregator"),
    ):
        with pytest.raises(HubRequestError) as refused:
            sponsor.create_run(bad)
        assert refused.value.status == 422 and field in refused.value.detail

    run_id = sponsor.create_run(tiny_run(privacy={"dp": DP}, budget={"rounds": 5})).run_id
    node_id = swarm.start_node("n0", run_id)

    def finished():
        status = sponsor.run_status(run_id)
        return status if status["status"] == "finished" else None

    status = wait_for(finished, 90, "the DP run to finish")
    # eps(2 rounds) = 7.08 <= 8 < eps(3 rounds) = 9.01 at z = 1, q = 1, delta = 1e-5
    assert status["version"] == 2
    p = status["privacy"]
    assert p["dp"] == "central" and p["delta"] == 1e-5 and p["epsilon_budget"] == 8.0
    expected = [epsilon_for(1.0, 1.0, k, 1e-5) for k in (1, 2)]
    assert [r["epsilon"] for r in p["epsilon_per_round"]] == pytest.approx(expected)
    assert p["epsilon"] == pytest.approx(expected[-1]) and p["epsilon"] <= 8.0
    assert "epsilon budget" in p["stop_reason"] and "9.01" in p["stop_reason"]
    assert [r["nodes"] for r in p["epsilon_per_round"]] == [1, 1]

    # The first round's aggregate (= the first momentum buffer) is the node's clipped update
    # plus Gaussian noise of std z * C: replay the update and look at the difference.
    engine = make_engine(swarm.db_url)
    with Session(engine) as s:
        v0, v1 = s.scalars(select(m.Version).order_by(m.Version.number)).all()[:2]
        a = s.scalars(select(m.Assignment).where(m.Assignment.round == 0)).one()
    blobs = swarm.workdir / "blobs"
    read = lambda digest: unpack_vector(next(blobs.rglob(digest)).read_bytes())  # noqa: E731
    cfg = RunConfig.model_validate(status["config"])
    update = Workload.from_config(cfg).train(read(v0.weights_blob), 0, node_id, a.inner_steps)
    clipped, norm = clip_updates(update.pseudo_gradient, DP["clip_norm"])
    noise = read(v1.momentum_blob) - clipped
    assert float(norm) > 0
    assert 0.47 < float(noise.std()) < 0.53  # z * C = 0.5
    assert abs(float(noise.mean())) < 0.02
    assert float(torch.corrcoef(torch.stack([noise, clipped]))[0, 1]) < 0.05
