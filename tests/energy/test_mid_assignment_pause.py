"""A node's own energy policy holds mid-assignment too (the simulator's nodes pause per chunk):
training waits while the policy refuses, the wait is neither training time nor training energy
in the claim, and a wait past the assignment's deadline drops the work without a failure."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from gridswarm.energy.meter import EnergyReading
from gridswarm.energy.policy import NodeDecision, parse_node_policy
from gridswarm.node.agent import Held, NodeAgent, NodeOptions, PausedPastDeadline, Stopped
from gridswarm.node.energy import EnergyUse, NodeEnergy, NodeEnergySettings
from gridswarm.protocol import Assignment, NodeStatus

ALLOW = NodeDecision(True, ())
REFUSE = NodeDecision(False, ("grid intensity 450 g/kWh > 300",))


def agent_with_policy(tmp_path: Path, decisions: list[NodeDecision]) -> NodeAgent:
    """A node whose policy answers `decisions` in turn (then the last one for ever)."""
    agent = NodeAgent(NodeOptions(hub_url="http://127.0.0.1:9", home=tmp_path / "node"))
    settings = NodeEnergySettings(
        region=None,
        policy=parse_node_policy({"max_intensity_g_per_kwh": 300.0}),
        check_every_s=0.05,
    )
    agent.energy = NodeEnergy(settings)
    answers = iter(decisions)
    last = [decisions[-1]]

    def decide(now_s: float | None = None) -> NodeDecision:
        last[0] = next(answers, last[0])
        return last[0]

    agent.energy.decide = decide
    return agent


def assignment(deadline_in_s: float) -> Assignment:
    return Assignment(
        id="a" * 32,
        run_id="r1",
        round=3,
        attempt=0,
        base_version=3,
        weights_blob="0" * 64,
        inner_steps=10,
        deadline_at=time.time() + deadline_in_s,
        config={},
    )


def test_training_waits_while_the_policy_refuses(tmp_path):
    agent = agent_with_policy(tmp_path, [REFUSE, REFUSE, REFUSE, ALLOW])
    held = Held()
    on_step = agent._step_hook(assignment(60), held)
    seen: list[NodeStatus] = []
    watcher = threading.Thread(target=lambda: (time.sleep(0.08), seen.append(agent.status)))
    time.sleep(0.06)  # one check interval has passed: the next step looks at the policy
    watcher.start()
    on_step(0, 5.0)
    watcher.join()
    assert seen == [NodeStatus.PAUSED] and agent.status == NodeStatus.TRAINING
    assert held.seconds >= 0.1  # three refusals, 0.05 s apart
    on_step(1, 5.0)  # within the check interval: no second look, no wait
    assert held.seconds < 1.0


def test_a_pause_past_the_deadline_drops_the_work(tmp_path):
    agent = agent_with_policy(tmp_path, [REFUSE])
    on_step = agent._step_hook(assignment(0.3), Held())
    time.sleep(0.06)
    with pytest.raises(PausedPastDeadline, match="round 3 of run r1"):
        on_step(0, 5.0)


def test_stopping_ends_a_pause(tmp_path):
    agent = agent_with_policy(tmp_path, [REFUSE])
    on_step = agent._step_hook(assignment(60), Held())
    time.sleep(0.06)
    threading.Timer(0.1, agent.stop_event.set).start()
    with pytest.raises(Stopped):
        on_step(0, 5.0)


def test_no_policy_no_check(tmp_path):
    agent = NodeAgent(NodeOptions(hub_url="http://127.0.0.1:9", home=tmp_path / "node"))
    agent.energy = NodeEnergy(NodeEnergySettings(region=None, check_every_s=0.05))
    agent.energy.decide = lambda now_s=None: pytest.fail("a node without rules never asks")
    on_step = agent._step_hook(assignment(60), Held())
    time.sleep(0.06)
    on_step(0, 5.0)


def test_the_claim_leaves_the_pause_out(tmp_path):
    agent = agent_with_policy(tmp_path, [ALLOW])
    reading = EnergyReading(
        energy_wh=10.0, power_w=3600.0, duration_s=10.0, method="model", assumptions=""
    )
    use = EnergyUse(reading, None, 300.0, None)
    trained_s, net = agent._net_of_pauses(10.0, use, Held(4.0))
    assert trained_s == pytest.approx(6.0)
    assert net.reading.energy_wh == pytest.approx(6.0) and net.reading.duration_s == pytest.approx(
        6.0
    )
    assert agent._net_of_pauses(10.0, use, Held()) == (10.0, use)
