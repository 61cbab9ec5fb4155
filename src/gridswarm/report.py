"""Human-readable views of a run's status (rich): progress, loss per round, and its nodes."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Group
from rich.table import Table
from rich.text import Text

from gridswarm.hub.lifecycle import RunState
from gridswarm.protocol import Liveness

SPARKS = "▁▂▃▄▅▆▇█"
STATE_STYLE = {Liveness.LIVE: "green", Liveness.SILENT: "yellow", Liveness.GONE: "dim"}
RUN_STYLE = {
    RunState.ACTIVE: "green",
    RunState.PAUSED: "yellow",
    RunState.STALLED: "red",
    RunState.STOPPED: "dim",
}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def sparkline(values: Sequence[float], width: int = 60) -> str:
    """One block character per value (the last `width`), low to high."""
    values = list(values)[-width:]
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(SPARKS[round((v - low) / span * (len(SPARKS) - 1))] for v in values)


def loss_line(losses: Sequence[float]) -> str:
    """Validation loss per version: start → now, and its sparkline."""
    if not losses:
        return "val loss: none yet"
    if len(losses) == 1:
        return f"val loss {losses[0]:.3f} (version 0: no round has closed yet)"
    return (
        f"val loss {losses[0]:.3f} → {losses[-1]:.3f} over {len(losses) - 1} rounds  "
        f"{sparkline(losses)}"
    )


def bytes_line(status: dict) -> str:
    """Bytes sent, and the data-parallel comparison only when there is something to compare."""
    up, down = status["bytes_up_total"], status["bytes_down_total"]
    dp = status["bytes_sync_dp_equivalent"]
    line = f"bytes up {human_bytes(up)}, down {human_bytes(down)}"
    if up and dp:
        line += f"; synchronous data parallel would have sent {human_bytes(dp)} ({dp / up:.0f}×)"
    elif not up:
        line += " (no contribution yet)"
    return line


def status_table(status: dict) -> Group:
    """One run: its state and why, the loss curve, bytes, and per-node totals and liveness."""
    state = status["status"]
    head = Text.assemble(
        f"run {status['id']} ({status['name']}) ",
        (state, RUN_STYLE.get(state, "")),
        f" — round {status['round']}, version {status['version']}",
    )
    lines: list[Text | Table] = [head]
    if status.get("status_reason"):
        lines.append(Text(f"reason: {status['status_reason']}"))
    lines += [Text(loss_line(status["val_loss"])), Text(bytes_line(status))]
    table = Table("node", "name", "state", "contributions", "tokens", "bytes up", "failures")
    for n in status["nodes"]:
        node_state = n.get("state", "")
        failures = str(n.get("failures", 0))
        if n.get("last_failure"):
            failures += f" — {n['last_failure']}"
        table.add_row(
            n["id"],
            n.get("name") or "",
            Text(node_state, STATE_STYLE.get(node_state, "")),
            str(n["contributions"]),
            f"{n['tokens']:,}",
            human_bytes(n["bytes_up"]),
            failures,
        )
    if status["nodes"]:
        table.caption = (
            f"live: heard from within {status.get('liveness_s', 20):g} s; silent: not since; "
            "gone: left"
        )
        lines.append(table)
    else:
        lines.append(Text("no node has worked on this run yet"))
    return Group(*lines)
