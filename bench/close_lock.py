"""How long a round's close holds the hub's lock, against the work it does outside it.

Every request of the hub waits while the lock is held (issue 9: no model work, blob I/O or
outside HTTP under it). A due close is computed in two parts (hub/ticker.py `advance_run`):
`_prepare_close`, outside the lock (pre-screening what the ticks had not reached, decode,
aggregate, outer step, blobs, held-out loss), then `advance` under it (the screening's
check, the version row, settlement: verdicts, rewards, reputations, ledger items, the next
round). This bench times both for one round of N never-seen nodes' uploads.

The real hub service in-process (tests/harness.py `new_service`: SQLite, a fake clock), a tiny
GPT run with one round of N places, N nodes registered and given their places in one batch,
each uploading a fake int8 update with honest claims (no training: audits and usefulness are
off, so the prepare is the close's own work), then one `advance_run`. Reported per N, median
of `--repeats`: milliseconds under the lock and outside it, and per contribution.

    PYTHONPATH=src:. python bench/close_lock.py --nodes 500 2000
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tests.conftest import tiny_run
from tests.harness import FakeClock, new_service
from tests.hub.harness import meta_fields

from gridswarm.hub.rounds import Decision
from gridswarm.identity import Identity
from gridswarm.protocol import ContributionMeta, RegisterRequest
from gridswarm.train.codecs import make_codec
from gridswarm.train.params import pack

NO_AUDITS = {"audit_max_rate": 0, "audit_min_rate": 0, "usefulness": False}
TOKENS_PER_STEP = 32 * 8  # tiny_run: seq_len x batch_size


def one(workdir: Path, nodes: int) -> dict[str, float]:
    """One round of `nodes` uploads closed: ms under the lock (`advance`) and outside it
    (`_prepare_close`)."""
    clock = FakeClock()
    service = new_service(workdir, clock)
    rounds = {"deadline_s": 600, "quorum": nodes, "min_nodes": 1, "max_nodes": nodes}
    cfg = tiny_run(round=rounds, trust=NO_AUDITS, budget={"rounds": 2})
    run_id = service.create_run(Identity.generate().public_key, cfg).run_id
    numel = service.run_status(run_id)["numel"]
    request = RegisterRequest(probe_tokens_per_s=1e4, probe_numel=numel)
    ids = [
        service.membership.register(Identity.generate().public_key, request) for _ in range(nodes)
    ]
    answers = service.asks.assignments_or_wait(run_id, ids)
    codec = make_codec("int8")
    for i, (node_id, (answer, _)) in enumerate(zip(ids, answers, strict=True)):
        update = 1e-3 * torch.randn(numel, generator=torch.Generator().manual_seed(i))
        meta = ContributionMeta(**meta_fields(answer.assignment, TOKENS_PER_STEP))
        service.uploads.submit(run_id, node_id, pack(codec.encode(update), meta.model_dump()))
    ticker = service.ticker
    spent = {"locked": 0.0, "unlocked": 0.0}
    advance, prepare = ticker.advance, ticker._prepare_close

    def timed_advance(run: str, defer_close: bool = False) -> Decision | None:
        started = time.perf_counter()
        try:
            return advance(run, defer_close=defer_close)
        finally:
            spent["locked"] += time.perf_counter() - started

    def timed_prepare(run: str) -> None:
        started = time.perf_counter()
        try:
            prepare(run)
        finally:
            spent["unlocked"] += time.perf_counter() - started

    ticker.advance, ticker._prepare_close = timed_advance, timed_prepare  # type: ignore[method-assign]
    clock.advance(1.0)
    decision = ticker.advance_run(run_id)
    if decision is not Decision.CLOSE:
        raise RuntimeError(f"the round did not close: {decision}")
    service.engine.dispose()
    return {k: v * 1e3 for k, v in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="results .json (.md beside)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for nodes in args.nodes:
        runs = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                runs.append(one(Path(tmp), nodes))
        locked = statistics.median(r["locked"] for r in runs)
        unlocked = statistics.median(r["unlocked"] for r in runs)
        rows.append(
            {
                "nodes": nodes,
                "locked_ms": locked,
                "unlocked_ms": unlocked,
                "locked_ms_per_contribution": locked / nodes,
                "unlocked_ms_per_contribution": unlocked / nodes,
                "runs": runs,
            }
        )
        print(
            f"{nodes} uploads: under the lock {locked:.0f} ms ({locked / nodes:.3f} ms each), "
            f"outside it {unlocked:.0f} ms ({unlocked / nodes:.3f} ms each)",
            flush=True,
        )
    if args.out is not None:
        args.out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
