"""An in-process hub for fast tests: the real app, service, SQLite database and blob store in a
temp folder, a clock the test moves, and real Ed25519-signed requests through FastAPI's
TestClient. The round ticker thread is not started: tests call `hub.service.ticker.tick()`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from fastapi.testclient import TestClient
from sqlalchemy import inspect, select, text
from typer.testing import CliRunner, Result

from gridswarm import cli
from gridswarm.config import parse_run_config
from gridswarm.hub import models as m
from gridswarm.hub import server
from gridswarm.hub.app import create_app
from gridswarm.hub.server import build_service
from gridswarm.hub.service import HubService, HubSettings
from gridswarm.identity import Identity, sign_request
from gridswarm.protocol import API, Assignment, ContributionMeta
from gridswarm.train.codecs import make_codec
from gridswarm.train.dataset import BlobSource
from gridswarm.train.params import pack
from gridswarm.train.workload import Workload
from tests.harness import FakeClock, train_and_pack


class Hub:
    """One in-process hub; `post`/`get` sign with the given identity (the clock's time)."""

    def __init__(self, root: Path, settings: HubSettings | None = None, **app_options: Any):
        self.root = root
        self.clock = FakeClock(time.time())  # signatures use the real clock
        self.service: HubService = build_service(
            f"sqlite:///{root / 'hub.db'}", root / "blobs", settings, clock=self.clock
        )
        self.app = create_app(self.service, **app_options)
        self.http = TestClient(self.app, raise_server_exceptions=False)

    def post(
        self,
        who: Identity,
        path: str,
        body: bytes | dict | str = b"",
        params: dict | None = None,
    ):
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
        headers = sign_request(who, "POST", path, body, now_s=self.clock())
        return self.http.post(path, content=body, headers=headers, params=params)

    def get(self, path: str, **params: Any):
        return self.http.get(path, params=params)

    # ------------------------------------------------------------ common steps

    def register(self, who: Identity, probe_tokens_per_s: float = 1e5, **extra: Any) -> str:
        body = {"probe_tokens_per_s": probe_tokens_per_s, "probe_numel": 1000, **extra}
        r = self.post(who, f"{API}/nodes/register", body)
        assert r.status_code == 200, r.text
        return r.json()["node_id"]

    def create_run(self, sponsor: Identity, config: dict) -> str:
        r = self.post(sponsor, f"{API}/runs", {"config": config})
        assert r.status_code == 200, r.text
        return r.json()["run_id"]

    def assignment(self, who: Identity, run_id: str) -> Assignment | None:
        r = self.post(who, f"{API}/runs/{run_id}/assignment", params={"wait_s": 0})
        assert r.status_code == 200, r.text
        answer = r.json()
        return Assignment(**answer["assignment"]) if answer["status"] == "assigned" else None

    def numel(self, run_id: str) -> int:
        return self.get(f"{API}/runs/{run_id}").json()["numel"]

    # ------------------------------------------------------------ what a refusal must not change

    def snapshot(self) -> dict[str, list]:
        """Every row of every hub table except the nonces (each signed request adds one)."""
        with self.service.sessions() as s:
            tables = inspect(s.get_bind()).get_table_names()
            return {
                t: sorted(map(repr, s.execute(text(f'SELECT * FROM "{t}"')).all()))
                for t in tables
                if t not in ("nonces", "alembic_version")
            }

    def blob_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.root / "blobs").rglob("*") if p.is_file())

    def run_row(self, run_id: str) -> m.Run:
        with self.service.sessions() as s:
            return s.scalars(select(m.Run).where(m.Run.id == run_id)).one()


def meta_fields(
    assignment: Assignment, tokens_per_step: int, codec: str = "int8", **meta: Any
) -> dict[str, Any]:
    """Honest claims for `assignment` (ContributionMeta fields), with `meta` overriding."""
    return {
        "assignment_id": assignment.id,
        "codec": codec,
        "steps": assignment.inner_steps,
        "tokens": assignment.inner_steps * tokens_per_step,
        "loss_first": 5.0,
        "loss_last": 4.0,
        "loss_mean": 4.5,
        "train_time_s": 1.0,
        "threads": 1,
    } | meta


def contribution(
    assignment: Assignment, numel: int, tokens_per_step: int, codec: str = "int8", **meta: Any
) -> bytes:
    """An honest-looking contribution blob for `assignment` (a small random update)."""
    update = torch.randn(numel, generator=torch.Generator().manual_seed(1)) * 1e-3
    fields = meta_fields(assignment, tokens_per_step, codec, **meta)
    return pack(make_codec(codec).encode(update), ContributionMeta(**fields).model_dump())


def hub_cli(monkeypatch, *args: str) -> tuple[Result, list[tuple[tuple, dict]]]:
    """`gridswarm hub ARGS` in this process, stopped before it serves: (result, serve's args).
    The command's `logging.basicConfig` is skipped: in process it would hang a handler on the
    runner's captured stream on the root logger, for every later test in this worker."""
    served: list[tuple[tuple, dict]] = []
    monkeypatch.setattr(server, "serve", lambda *a, **kw: served.append((a, kw)))
    monkeypatch.setattr(logging, "basicConfig", lambda **_: None)  # leave pytest's logging
    result = CliRunner().invoke(cli.app, ["hub", "--db", "sqlite:///unused.db", *args])
    return result, served


def train_round(hub: Hub, run_id: str, source: BlobSource | None = None) -> dict:
    """One new node trains the run's open round for real (its data read through `source`, a
    node's blob source, when given) and uploads; the hub closes the round at its next tick.
    The run's status after."""
    cfg = parse_run_config(hub.get(f"{API}/runs/{run_id}").json()["config"])
    workload = Workload.from_config(cfg, source=source)
    node = Identity.generate()
    node_id = hub.register(node)
    assignment = hub.assignment(node, run_id)
    assert assignment is not None
    codec = make_codec(cfg.comm.codec, cfg.comm.block_size)
    body = train_and_pack(hub.service, run_id, node, node_id, assignment, workload, codec)
    r = hub.post(node, f"{API}/runs/{run_id}/contributions", body)
    assert r.status_code == 200, r.text
    hub.clock.advance(1.0)
    hub.service.ticker.tick()
    return hub.get(f"{API}/runs/{run_id}").json()
