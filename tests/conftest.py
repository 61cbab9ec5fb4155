"""Shared fixtures: tiny run settings, local swarms of real processes, a real PostgreSQL server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from sqlalchemy import create_engine, text

from gridswarm.swarm import Swarm, free_port, local_postgres
from tests.examples import choose_profile

torch.set_num_threads(1)
REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def pytest_configure(config: pytest.Config) -> None:
    """Fewer hypothesis examples in the fast lane (`-m "not slow"`), all in the full suite
    (tests/examples.py); loaded here, before any test module builds its settings."""
    try:
        settings.load_profile(choose_profile(config.getoption("markexpr") or ""))
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None


def pytest_report_header(config: pytest.Config) -> str:
    return f"hypothesis profile: {settings.get_current_profile_name()} (tests/examples.py)"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Test files with a `slow` test first, each file's tests in their order: `scripts/test`
    hands files to two workers (`--dist loadfile`) in this order, so the long live runs start
    early and the many short files fill in beside them instead of one live run ending alone."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: order kept otherwise


def tiny_run(**overrides: object) -> dict:
    """Run settings small enough for a swarm test to finish rounds in a second or two."""
    cfg: dict = {
        "name": "tiny",
        "seed": 7,
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32},
        "train": {"seq_len": 32, "batch_size": 8, "inner_steps": 20, "min_inner_steps": 2},
        "round": {"deadline_s": 30, "quorum": 1, "min_nodes": 1},
        "budget": {"rounds": 3},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            cfg.setdefault(section, {})[field] = value
        else:
            cfg[section] = value
    return cfg


@pytest.fixture
def make_swarm(tmp_path: Path, tmp_path_factory) -> Iterator[Callable[..., Swarm]]:
    """Factory of local swarms; every process started is stopped (by pid) at teardown. Hub and
    nodes may read datasets under the session's temporary folders (`--data-root`)."""
    swarms: list[Swarm] = []

    def make(**kwargs: object) -> Swarm:
        swarm = Swarm(tmp_path / f"swarm{len(swarms)}", free_port(), **kwargs)
        swarm.data_roots = [tmp_path_factory.getbasetemp()]
        swarm.workdir.mkdir(parents=True)
        swarms.append(swarm)
        return swarm

    yield make
    for swarm in swarms:
        swarm.stop()


@pytest.fixture
def in_process_hub(tmp_path: Path) -> Iterator[Callable[[], tuple]]:
    """A real hub service and app in this process, reached through Starlette's test transport
    (its lifespan runs: the ticker screens and closes rounds as a hub process does).
    Yields `make()` -> (service, connect), where `connect(identity)` gives a signed HubClient."""
    from fastapi.testclient import TestClient

    from gridswarm.hub.app import create_app
    from gridswarm.hub.server import build_service
    from gridswarm.node.client import HubClient

    clients: list[TestClient] = []

    def make() -> tuple:
        service = build_service(f"sqlite:///{tmp_path}/hub.db", tmp_path / "blobs")
        http = TestClient(create_app(service))
        http.__enter__()  # lifespan: the app's thread limiter and ticker
        clients.append(http)

        def connect(identity):
            client = HubClient("http://testserver", identity, retry_for_s=2)
            client.http = http
            return client

        return service, connect

    yield make
    for http in clients:
        http.__exit__(None, None, None)


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.2):
    """Poll `predicate` until it returns something truthy; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server in a temporary folder on a free loopback port."""
    with local_postgres() as url:
        yield url


@pytest.fixture
def pg_database(postgres_url: str) -> Iterator[str]:
    """A fresh database of its own on the session's PostgreSQL server."""
    name = f"replicas_{uuid.uuid4().hex[:10]}"
    admin = create_engine(
        postgres_url.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as c:
        c.execute(text(f"CREATE DATABASE {name}"))
    yield postgres_url.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as c:
        c.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3-compatible server (moto's standalone server) on 127.0.0.1, with the standard AWS
    environment variables pointing at it for the whole session."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(
        AWS_ENDPOINT_URL=url,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        wait_for(lambda: _answers(url), 30, "the S3 server to start")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def _answers(url: str) -> bool:
    import httpx

    try:
        httpx.get(url, timeout=1)
        return True
    except httpx.HTTPError:
        return False
