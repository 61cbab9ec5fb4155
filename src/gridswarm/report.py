"""Human-readable views of a run's status (rich tables)."""

from __future__ import annotations

from rich.table import Table


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def status_table(status: dict) -> Table:
    """Per-node totals of one run, titled with its progress."""
    losses = status["val_loss"]
    title = (
        f"run {status['id']} ({status['status']}) — round {status['round']}, "
        f"version {status['version']}, val loss {losses[0]:.3f} → {losses[-1]:.3f}"
    )
    table = Table("node", "name", "contributions", "tokens", "bytes up", "bytes down", title=title)
    for n in status["nodes"]:
        table.add_row(
            n["id"],
            n.get("name") or "",
            str(n["contributions"]),
            f"{n['tokens']:,}",
            human_bytes(n["bytes_up"]),
            human_bytes(n["bytes_down"]),
        )
    up = status["bytes_up_total"]
    dp = status["bytes_sync_dp_equivalent"]
    table.caption = (
        f"bytes up {human_bytes(up)} (down {human_bytes(status['bytes_down_total'])}); "
        f"synchronous data parallel would have sent {human_bytes(dp)}"
        + (f" — {dp / up:.0f}× more" if up else "")
    )
    return table
