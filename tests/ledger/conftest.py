"""Ledger test fixtures: a hub identity, an SQLite ledger, a real anvil node, a real PostgreSQL.

anvil and PostgreSQL are real processes on 127.0.0.1, started here and stopped by pid. A missing
anvil is a test failure, not a skip: CI must install it (npm package @foundry-rs/anvil-linux-amd64).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from web3 import Web3

from gridswarm.identity import Identity
from gridswarm.ledger.anvil import Anvil, AnvilNotFoundError, find_anvil
from gridswarm.ledger.log import Ledger, open_ledger


@pytest.fixture
def hub() -> Identity:
    return Identity.from_seed(b"test-hub")


@pytest.fixture
def ledger(tmp_path: Path, hub: Identity) -> Ledger:
    return open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}", hub, checkpoint_every=8)


@pytest.fixture(scope="session")
def anvil() -> Iterator[Anvil]:
    try:
        binary = find_anvil(install=True)
    except AnvilNotFoundError as exc:
        pytest.fail(f"anvil is required for the EVM settlement tests: {exc}")
    node = Anvil(binary).start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def w3(anvil: Anvil) -> Web3:
    return Web3(Web3.HTTPProvider(anvil.url))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server (initdb + postgres on a free port), stopped by pid.

    PostgreSQL refuses to run as root, so under root it runs as `nobody` via setpriv.
    """
    initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
    if not initdb or not postgres:
        pytest.fail("PostgreSQL binaries (initdb, postgres) are required for the postgres tests")
    prefix: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="gridswarm-pg-"))
    if os.geteuid() == 0:
        prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        shutil.chown(root, "nobody", "nogroup")
    data = root / "data"
    subprocess.run(
        [*prefix, initdb, "-D", str(data), "-U", "gridswarm", "--auth=trust", "--no-sync"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    port = _free_port()
    server = [postgres, "-D", str(data), "-p", str(port), "-h", "127.0.0.1", "-k", str(root)]
    proc = subprocess.Popen(
        [*prefix, *server, "-c", "fsync=off", "-c", "full_page_writes=off"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                dsn = f"host=127.0.0.1 port={port} user=gridswarm dbname=postgres"
                psycopg.connect(dsn).close()
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("PostgreSQL did not start")
                time.sleep(0.1)
        yield f"postgresql+psycopg://gridswarm@127.0.0.1:{port}/postgres"
    finally:
        proc.send_signal(signal.SIGQUIT)  # immediate shutdown: the data is thrown away anyway
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        shutil.rmtree(root, ignore_errors=True)
