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
