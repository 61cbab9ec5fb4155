"""bench/hub_load.py's report: the Markdown table and the plot, from a results document (the
measurement itself runs thousands of nodes: `tests/test_bench_hub_request_cost.py` drives its
client against a real hub)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.benches import load_bench

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "hub_load_engine.json"


def test_a_document_becomes_a_table_and_a_plot(tmp_path: Path) -> None:
    bench = load_bench("hub_load")
    document = json.loads(RESULTS.read_text())
    text = bench.markdown(document)
    for r in document["results"]:  # a row per configuration, with its contributions
        assert f"| {r['nodes']} |" in text and f"| {r['contributions_in_window']} |" in text
    png = tmp_path / "hub_load.png"
    bench.plot(document, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_round_start_spread_is_from_the_hubs_opening_without_the_long_poll() -> None:
    """Synthetic answers: two rounds opened in the window (deadline 600 s, so each opened at
    deadline_at - 600), one before it. Delays are answered_at - opening, per round and over
    all; a round opened outside the window is left out, whatever its answers' times."""
    bench = load_bench("hub_load")
    t0 = 1_000_000.0
    assigned = [(1, 0, t0 - 50 + 600, t0 - 50 + d) for d in (0.01, 0.02, 9.0)]  # before
    assigned += [(2, 0, t0 + 100 + 600, t0 + 100 + d) for d in (0.05, 0.10, 0.20, 0.30)]
    assigned += [(3, 1, t0 + 400 + 600, t0 + 400 + d) for d in (0.5, 2.0)]
    spread = bench.round_start_spread(assigned, 600.0, (t0, t0 + 500))
    assert spread["rounds"] == 2 and spread["n"] == 6
    assert [(x["round"], x["attempt"], x["answers"]) for x in spread["per_round"]] == [
        (2, 0, 4),
        (3, 1, 2),
    ]
    second = spread["per_round"][0]
    assert (second["first_ms"], second["p50_ms"], second["max_ms"]) == (50.0, 100.0, 300.0)
    assert spread["p50_ms"] == 200.0 and spread["p99_ms"] == spread["max_ms"] == 2000.0
    empty = bench.round_start_spread(assigned, 600.0, (t0 + 600, t0 + 700))
    assert empty["n"] == 0 and empty["per_round"] == []


def test_the_table_and_plot_tell_the_long_poll_from_the_round_start(tmp_path: Path) -> None:
    """A document with the new fields beside one from before them: each row shows its shape
    and both assignment figures (or "-"), the Markdown says which is which, the plot draws."""
    bench = load_bench("hub_load")
    document = json.loads(RESULTS.read_text())
    old = document["results"][0]
    new = {
        **old,
        "nodes": 10000,
        "train_s": 300.0,
        "deadline_s": 600.0,
        "endpoints": {
            **old["endpoints"],
        },
        "registration": {"n": 10, "p50_ms": 12.0, "p99_ms": 80.0},
        "round_start_spread": {
            "rounds": 1,
            "n": 3,
            "p50_ms": 140.0,
            "p99_ms": 230.0,
            "max_ms": 230.0,
            "per_round": [
                {
                    "round": 7,
                    "attempt": 0,
                    "opened_at": 1.0,
                    "answers": 3,
                    "first_ms": 9.0,
                    "p50_ms": 140.0,
                    "p99_ms": 230.0,
                    "max_ms": 230.0,
                }
            ],
        },
    }
    document["results"] = [old, new]
    old_row, new_row = bench.rows(document["results"])
    columns = list(bench.COLUMNS)
    spread_at = columns.index("round start spread p50/p99 ms")
    wait_at = columns.index("assignment request incl. long-poll wait p50/p99 ms")
    assert old_row[spread_at] == "-" and old_row[columns.index("train s / deadline s")] == "-"
    assert (
        new_row[spread_at] == "140/230"
        and new_row[columns.index("register (ramp incl.) p50/p99 ms")] == "12/80"
    )
    assert new_row[wait_at] == f"{old['endpoints']['assignment']['p50_ms']:.0f}/" + (
        f"{old['endpoints']['assignment']['p99_ms']:.0f}"
    )
    assert new_row[columns.index("train s / deadline s")] == "300 / 600"
    text = bench.markdown(document)
    assert "long-poll wait" in text and "| 7 | 0 | 3 | 9 | 140 | 230 | 230 |" in text
    png = tmp_path / "hub_load.png"
    bench.plot(document, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
