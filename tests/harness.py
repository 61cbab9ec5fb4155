"""An in-process swarm for proving refactors: the real hub service on a temporary SQLite database, a
fake clock, and nodes with fixed speeds that train with the real training path.

Nothing here is timed: a node's training "takes" `tokens / speed_tokens_per_s` seconds of the
fake clock, so the hub's planning (inner steps per node, deadlines, round closes) sees the same
numbers on every machine. With one torch thread and portable kernels (`PORTABLE_NUMERICS`: ATen's
scalar kernels and MKL's reproducible path, so AVX2 and AVX-512 machines agree to the bit) the
whole run is deterministic, so its loss curve and the hash of every published version can be
committed and compared bit for bit after a change to the hub (`tests/test_golden_curve.py`).
Regenerate the committed curve only for a deliberate numerics change, and show the old and new
curves side by side when doing so (the command sets the environment itself):

    PYTHONPATH=src python -m tests.harness --write tests/data/golden_curve.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.orm import Session

from gridswarm.blobs import LocalBlobStore
from gridswarm.config import RunConfig
from gridswarm.hub import models as m
from gridswarm.hub.lifecycle import RunState
from gridswarm.hub.server import migrate
from gridswarm.hub.service import HubService, HubSettings
from gridswarm.hub.states import AssignmentStatus, ContributionStatus, RoundStatus
from gridswarm.identity import Identity
from gridswarm.protocol import Assignment, ContributionMeta, NodeStatus, RegisterRequest
from gridswarm.train.codecs import Codec, make_codec
from gridswarm.train.params import pack, unpack_vector
from gridswarm.train.workload import Workload
from gridswarm.trust.claims import sign_contribution

# A fixed-seed run small enough to finish in seconds on one CPU thread.
GOLDEN_RUN: dict = {
    "name": "golden",
    "seed": 11,
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 32},
    "train": {"seq_len": 32, "batch_size": 8, "inner_steps": 12, "min_inner_steps": 2},
    "round": {"deadline_s": 60, "quorum": 2, "min_nodes": 2},
    "budget": {"rounds": 6},
}
# Three nodes: the fast one sets H, the others get proportionally fewer inner steps.
GOLDEN_SPEEDS_TOKENS_PER_S: tuple[float, ...] = (4000.0, 2000.0, 1000.0)


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start_s: float = 1_800_000_000.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


@dataclass
class HarnessNode:
    identity: Identity
    node_id: str
    speed_tokens_per_s: float


def scratch_engine(path: Path) -> Engine:
    """A SQLite engine for a test's throwaway database at `path`: commits are not fsynced
    (`PRAGMA synchronous=OFF`; a process crash still loses nothing committed, only an OS crash
    could, and nothing outlives the test). What the hub computes is unchanged: the golden curve
    is the same bit for bit."""
    engine = create_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def _no_fsync(conn, _record) -> None:
        cur = conn.cursor()
        cur.execute("PRAGMA synchronous=OFF")
        cur.close()

    return engine


def new_service(workdir: Path, clock: FakeClock, settings: HubSettings | None = None) -> HubService:
    """The real hub service on a fresh SQLite database (`scratch_engine`) and blob folder in
    `workdir`."""
    engine = scratch_engine(workdir / "hub.db")
    migrate(engine)
    service = HubService(engine, LocalBlobStore(workdir / "blobs"), settings, clock=clock)
    service.trust.ensure_genesis()
    return service


# each table's status column and the enum its stored values must belong to
STATUS_COLUMNS = (
    (m.Run.status, RunState),
    (m.Round.status, RoundStatus),
    (m.Assignment.status, AssignmentStatus),
    (m.Contribution.status, ContributionStatus),
    (m.Node.status, NodeStatus),
)


def stored_statuses(engine: Engine) -> dict[str, set[str]]:
    """The distinct status values stored in each of the run, round, assignment and
    contribution tables, by table name."""
    with Session(engine) as s:
        return {
            col.class_.__tablename__: set(s.scalars(select(col).distinct()))
            for col, _ in STATUS_COLUMNS
        }


def assert_statuses_typed(engine: Engine) -> dict[str, set[str]]:
    """Every status value the hub stored in `engine`'s database is a member of its enum
    (hub/states.py, RunState); returns what was stored, for the caller to assert on further."""
    stored = stored_statuses(engine)
    for col, enum in STATUS_COLUMNS:
        unknown = stored[col.class_.__tablename__] - {e.value for e in enum}
        assert not unknown, f"{col.class_.__tablename__}.status not in {enum.__name__}: {unknown}"
    return stored


def train_and_pack(
    service: HubService,
    run_id: str,
    identity: Identity,
    node_id: str,
    a: Assignment,
    workload: Workload,
    codec: Codec,
    speed_tokens_per_s: float | None = None,
) -> bytes:
    """What a node uploads for assignment `a`: train it for real from the version the hub
    serves, encode, sign the claim, pack. `speed_tokens_per_s` sets the claimed training time
    (fake-clock seconds; 1 s without it)."""
    theta = unpack_vector(service.blobs.get(a.weights_blob))
    result = workload.train(theta, a.round, node_id, a.inner_steps, a.attempt)
    tensors = codec.encode(result.pseudo_gradient)
    meta = ContributionMeta(
        assignment_id=a.id,
        codec=codec.name,
        steps=result.steps,
        tokens=result.tokens,
        loss_first=result.loss_first,
        loss_last=result.loss_last,
        loss_mean=result.loss_mean,
        train_time_s=result.tokens / speed_tokens_per_s if speed_tokens_per_s else 1.0,
        threads=1,
    )
    claim = sign_contribution(identity, run_id, a.round, tensors, meta.model_dump())
    return pack(tensors, meta.model_copy(update={"claim": claim}).model_dump())


def contribute(hub: HubService, run_id: str, identity: Identity, node_id: str) -> None:
    """Ask `hub` for work as `node_id`, train it for real and upload it to `hub`."""
    answer = hub.asks.request_assignment(run_id, node_id)
    assert answer.status == "assigned", answer
    workload = Workload.from_config(RunConfig.model_validate(answer.assignment.config))
    codec = make_codec(workload.cfg.comm.codec, workload.cfg.comm.block_size)
    body = train_and_pack(hub, run_id, identity, node_id, answer.assignment, workload, codec)
    hub.uploads.submit(run_id, node_id, body)


def run_golden(
    workdir: Path,
    config: dict | None = None,
    speeds: tuple[float, ...] = GOLDEN_SPEEDS_TOKENS_PER_S,
    max_steps: int = 400,
) -> dict:
    """Run the fixed-seed swarm to its budget; the loss curve and version hashes it published."""
    torch.set_num_threads(1)
    clock = FakeClock()
    service = new_service(workdir, clock)
    sponsor = Identity.generate()
    run_id = service.create_run(sponsor.public_key, config or GOLDEN_RUN).run_id
    # the nodes build their own model and corpus from the run's settings, as real nodes do
    workload = Workload.from_config(RunConfig.model_validate(service.run_status(run_id)["config"]))
    nodes = []
    for i, speed in enumerate(speeds):
        ident = Identity.from_seed(hashlib.sha256(f"golden node {i}".encode()).digest())
        request = RegisterRequest(
            probe_tokens_per_s=speed, probe_numel=workload.numel, name=f"node{i}"
        )
        nodes.append(
            HarnessNode(ident, service.membership.register(ident.public_key, request), speed)
        )
    codec = make_codec(workload.cfg.comm.codec, workload.cfg.comm.block_size)
    for _ in range(max_steps):
        if service.run_status(run_id)["status"] != "active":
            break
        for node in nodes:
            answer = service.asks.request_assignment(run_id, node.node_id)
            if answer.status != "assigned":
                continue
            body = train_and_pack(
                service,
                run_id,
                node.identity,
                node.node_id,
                answer.assignment,
                workload,
                codec,
                speed_tokens_per_s=node.speed_tokens_per_s,
            )
            service.uploads.submit(run_id, node.node_id, body)
        clock.advance(1.0)
        service.ticker.tick()
    status = service.run_status(run_id)
    versions = _version_hashes(service, run_id)
    return {
        "config": config or GOLDEN_RUN,
        "speeds_tokens_per_s": list(speeds),
        "status": status["status"],
        "curve": [
            {"version": p["version"], "tokens": p["tokens"], "val_loss_hex": p["val_loss"].hex()}
            for p in status["curve"]
        ],
        "val_loss": [p["val_loss"] for p in status["curve"]],
        "weights_sha256": versions,
        "contributions": sorted(
            (n["name"], n["contributions"], n["tokens"]) for n in status["nodes"]
        ),
    }


def _version_hashes(service: HubService, run_id: str) -> list[str]:
    """sha256 of each published version's raw fp32 weights (the blob's digest also covers the
    run id, which is random)."""
    with service.sessions() as s:
        blobs = s.scalars(
            select(m.Version.weights_blob)
            .where(m.Version.run_id == run_id)
            .order_by(m.Version.number)
        ).all()
    return [
        hashlib.sha256(unpack_vector(service.blobs.get(b)).numpy().tobytes()).hexdigest()
        for b in blobs
    ]


# read by torch and MKL when they load: a process must start with them (`main` re-executes itself)
PORTABLE_NUMERICS = {
    "ATEN_CPU_CAPABILITY": "default",  # no AVX2/AVX-512 specialised ATen kernels
    "MKL_CBWR": "COMPATIBLE",  # MKL's conditional numerical reproducibility: same bits on any x86
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def main() -> None:
    if any(os.environ.get(k) != v for k, v in PORTABLE_NUMERICS.items()):
        env = {**os.environ, **PORTABLE_NUMERICS}
        os.execve(sys.executable, [sys.executable, "-m", "tests.harness", *sys.argv[1:]], env)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, help="write the curve here (a deliberate change)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_golden(Path(tmp))
    text = json.dumps(result, indent=1, sort_keys=True) + "\n"
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
