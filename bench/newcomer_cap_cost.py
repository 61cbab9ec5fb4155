"""What the newcomer cap (`round.max_newcomer_share`) costs one batch of asks for work.

The real hub service in-process (tests/harness.py `new_service`: SQLite, a fake clock), N
never-worked nodes registered, one run of `max_nodes` = N, and all N asks decided in one batch
(`Asks.assignments_or_wait`, one transaction, as the HTTP layer gathers them), then up
to `--singles` of the nodes left waiting ask again one at a time (each its own transaction,
reading the stored counts). Three runs: no cap (share 1.0, the default: every node gets a
place), the cap (`--share`, which fills within the batch, its places unflushed), and no cap
on a round of as many places as the cap gives (the same places given, the rest waiting for a
full round: the wait before the trust admission). Reported: wall milliseconds per ask, median
of `--repeats`. A waiting newcomer under the cap pays the admission's ranking too (it lists
the live nodes when more wait than places are left, as before the cap), a full round does
not. In-process and on a shared machine: read the ratios.

    PYTHONPATH=src:. python bench/newcomer_cap_cost.py --nodes 1000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tests.conftest import tiny_run
from tests.harness import FakeClock, new_service

from gridswarm.identity import Identity
from gridswarm.protocol import RegisterRequest
from gridswarm.trust.policy import newcomer_places


def one(
    workdir: Path, nodes: int, max_nodes: int, share: float, singles: int
) -> tuple[float, float, int]:
    """(ms per ask in one batch, ms per single ask after it, places given) for one round."""
    service = new_service(workdir, FakeClock())
    rounds = {"deadline_s": 60, "quorum": 1, "min_nodes": 1, "max_nodes": max_nodes}
    cfg = tiny_run(round=rounds | {"max_newcomer_share": share})
    run_id = service.create_run(Identity.generate().public_key, cfg).run_id
    request = RegisterRequest(probe_tokens_per_s=1e5, probe_numel=1000)
    ids = [
        service.membership.register(Identity.generate().public_key, request) for _ in range(nodes)
    ]
    t0 = time.perf_counter()
    answers = service.asks.assignments_or_wait(run_id, ids)
    batch_ms = (time.perf_counter() - t0) * 1e3 / nodes
    given = sum(a[0].status == "assigned" for a in answers)
    waiting = [n for n, a in zip(ids, answers, strict=True) if a[0].status != "assigned"]
    waiting = waiting[:singles]
    t0 = time.perf_counter()
    for node_id in waiting:
        service.asks.request_assignment(run_id, node_id)
    single_ms = (time.perf_counter() - t0) * 1e3 / max(len(waiting), 1)
    service.engine.dispose()
    return batch_ms, single_ms if waiting else float("nan"), given


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--share", type=float, default=0.25)
    parser.add_argument("--singles", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    places = newcomer_places(args.share, args.nodes)
    print(f"{args.nodes} never-worked nodes ask in one batch, then {args.singles} waiting again")
    print("| max_nodes | share | places given | ms/ask, batch | ms/ask, single (waiting) |")
    print("|---|---|---|---|---|")
    for max_nodes, share in ((args.nodes, 1.0), (args.nodes, args.share), (places, 1.0)):
        runs = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                runs.append(one(Path(tmp), args.nodes, max_nodes, share, args.singles))
        batch = statistics.median(r[0] for r in runs)
        single = statistics.median(r[1] for r in runs)
        print(f"| {max_nodes} | {share:g} | {runs[0][2]} | {batch:.3f} | {single:.3f} |")


if __name__ == "__main__":
    main()
