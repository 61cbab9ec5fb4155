"""bench/hub_upload_profile.py's sorting of py-spy stacks into the parts of an upload (the
profiler itself is a dev tool the suite does not install)."""

from __future__ import annotations

from pathlib import Path

from tests.benches import load_bench


def test_each_stack_goes_to_the_first_part_it_matches(tmp_path: Path):
    profile = load_bench("hub_upload_profile")
    raw = tmp_path / "upload.raw"
    raw.write_text(
        "thread (1): MainThread;run (asyncio/runners.py:118) 5\n"
        "thread (2): AnyIO worker thread;WorkerThread.run (x.py:1);"
        "Uploads.check_upload (uploads.py:1);unpack (params.py:58) 3\n"
        "thread (2): AnyIO worker thread;WorkerThread.run (x.py:1);"
        "Uploads._store_batch (uploads.py:1);Uploads._store_in_savepoint (uploads.py:2);"
        "Uploads._store_contribution (uploads.py:3);apply_effects (round_store.py:4) 2\n"
        "thread (3): round-ticker;create_app.<locals>.ticker (app.py:1);"
        "Uploads._store_contribution (uploads.py:3) 1\n"
        "thread (4): other;somewhere (y.py:1) 1\n"
    )
    counts, total = profile.parts(raw)
    assert total == 12
    assert counts["event loop (HTTP, FastAPI, hops)"] == 5
    assert counts["check: unpack + metadata"] == 3
    assert counts["store: the two rows (Core INSERT, UPDATE)"] == 2
    assert counts["ticker (tick, pre-screening)"] == 1  # the ticker's rule comes first
    assert counts["other"] == 1
