"""How an assignment's training stops or waits before its steps are done: the node asked to
stop, or its own energy policy holding it (node/agent.py's step hook raises and counts these;
node/streaming_round.py's rounds use the same)."""

from __future__ import annotations

from dataclasses import dataclass


class Stopped(Exception):
    """The node was asked to stop in the middle of an assignment."""


class PausedPastDeadline(Exception):
    """The node's own energy policy held an assignment past its deadline: the work is dropped
    (the hub counts the place as missed), which is the owner's choice, not a training failure."""


@dataclass
class Held:
    """Seconds one assignment's training sat paused by the node's own energy policy; they are
    neither training time (the hub's speed estimate) nor training energy in the claim."""

    seconds: float = 0.0
