"""Local swarms of real processes: one hub and any number of nodes, started and killed by pid.

Used by the demo, the tests and the benchmarks, so all three exercise the same real processes
talking real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx

from gridswarm.identity import Identity
from gridswarm.node.client import CA_ENV, tls_verify


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plain_http(folder: Path) -> Path:
    """A folder that, first on a hub process's PYTHONPATH, hides httptools and uvloop from it:
    uvicorn's "auto" then parses HTTP in Python (h11) on asyncio's own loop, as on a machine
    without them (benchmarks measure the hub before and after they became dependencies)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("httptools", "uvloop"):
        (folder / f"{name}.py").write_text(
            f'raise ImportError("{name} hidden by gridswarm.swarm.plain_http")\n'
        )
    return folder


def _pg_bindir() -> Path:
    """The newest Debian PostgreSQL binaries, else those on PATH."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    if candidates:
        return Path(candidates[0])
    if found := shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (see .ci/run)")


@contextmanager
def local_postgres(
    max_connections: int = 100, settings: dict[str, str] | None = None
) -> Iterator[str]:
    """A real PostgreSQL server in a temporary folder on a free loopback port (tests, bench);
    `settings`: more server settings (`-c name=value`), e.g. shared_preload_libraries."""
    bindir = _pg_bindir()
    datadir = Path(tempfile.mkdtemp(prefix="gridswarm-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(datadir, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def pg_ctl(*args: str) -> None:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(datadir / "db"), *args],
            check=True,
            capture_output=True,
        )

    subprocess.run(
        [
            *as_user,
            str(bindir / "initdb"),
            "-D",
            str(datadir / "db"),
            "-U",
            "postgres",
            "-A",
            "trust",
        ],
        check=True,
        capture_output=True,
    )
    options = (
        f"-p {port} -k {datadir} -c listen_addresses=127.0.0.1 -c max_connections={max_connections}"
    )
    options += "".join(f" -c {name}={value}" for name, value in (settings or {}).items())
    pg_ctl("-l", str(datadir / "log"), "-w", "-o", options, "start")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        with suppress(subprocess.CalledProcessError):
            pg_ctl("-m", "immediate", "stop")
        shutil.rmtree(datadir, ignore_errors=True)


def wait_healthy(
    url: str, proc: subprocess.Popen, timeout_s: float = 60.0, verify: ssl.SSLContext | bool = True
) -> None:
    """Wait until the hub process answers /healthz (`verify`: the CA to trust for https)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"hub exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0, verify=verify).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"hub at {url} did not become healthy in {timeout_s} s")


class Swarm:
    """The processes of a local swarm: one hub, any number of nodes (started and killed by pid)."""

    def __init__(
        self, workdir: Path, port: int, liveness_s: float = 8.0, db_url: str | None = None
    ) -> None:
        self.workdir = workdir
        self.db_url = db_url or f"sqlite:///{workdir / 'hub.db'}"
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.liveness_s = liveness_s
        self.hub: subprocess.Popen | None = None
        self.nodes: dict[str, subprocess.Popen] = {}
        self.names: dict[str, str] = {}
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.hub_extra: list[str] = []  # more `gridswarm hub` options, e.g. ["--signals", PATH]
        # the hub's blob store: its folder in the workdir, or s3://bucket/prefix (then the hub's
        # key and blob cache live in workdir/hub-home)
        self.blobs: str | None = None
        self.replicas: dict[int, subprocess.Popen] = {}  # port -> hub replica (start_replica)
        # folders a run's data.dataset may name (`--data-root` of the hub and of every node)
        self.data_roots: list[Path] = []

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        """`python -m gridswarm.cli ARGS` with output appended to `log_name` in the workdir."""
        with open(self.workdir / log_name, "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "gridswarm.cli", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )

    def _hub_args(self, port: int) -> list[str]:
        blobs = self.blobs or str(self.workdir / "blobs")
        home = ["--home", str(self.workdir / "hub-home")] if blobs.startswith("s3://") else []
        return [
            "hub",
            "--db",
            self.db_url,
            "--blobs",
            blobs,
            "--port",
            str(port),
            "--liveness-s",
            str(self.liveness_s),
            *home,
            *self._data_root_args(),
            *self.hub_extra,
        ]

    def _data_root_args(self) -> list[str]:
        return [arg for root in self.data_roots for arg in ("--data-root", str(root))]

    def start_hub(self, timeout_s: float = 60.0) -> None:
        self.hub = self._spawn(self._hub_args(self.port), "hub.log")
        wait_healthy(self.url, self.hub, timeout_s, verify=tls_verify(self.env.get(CA_ENV)))

    def start_replica(self, port: int, wait: bool = True, timeout_s: float = 90.0) -> str:
        """Start one more hub process on `port` over the same database and blob folder (and so
        the same hub key): a replica (PostgreSQL only). Returns its URL."""
        self.replicas[port] = self._spawn(self._hub_args(port), f"hub-{port}.log")
        url = f"http://127.0.0.1:{port}"
        if wait:
            wait_healthy(url, self.replicas[port], timeout_s)
        return url

    def kill_replica(self, port: int) -> None:
        """SIGKILL the replica on `port` (by its pid), as in a crash."""
        self.replicas[port].send_signal(signal.SIGKILL)
        self.replicas[port].wait(timeout=10)

    def kill_hub(self) -> None:
        """SIGKILL the hub: no shutdown code runs, as in a crash."""
        self.hub.send_signal(signal.SIGKILL)
        self.hub.wait(timeout=10)

    def start_node(
        self,
        name: str,
        run_id: str | None,  # None: the node works on the newest active run, then the next
        throttle: float = 0.0,
        extra: list[str] | None = None,
        hub_url: str | None = None,  # e.g. a recording proxy in front of the hub
    ) -> str:
        home = self.workdir / name
        node_id = Identity.load_or_create(home / "node.key").node_id
        self.nodes[node_id] = self._spawn(
            [
                "node",
                "--hub",
                hub_url or self.url,
                "--home",
                str(home),
                *(["--run", run_id] if run_id else []),
                "--name",
                name,
                "--throttle",
                str(throttle),
                "--max-threads",
                "1",
                *self._data_root_args(),
                *(extra or []),
            ],
            f"{name}.log",
        )
        self.names[node_id] = name
        return node_id

    def kill_node(self, node_id: str) -> None:
        self.nodes[node_id].send_signal(signal.SIGKILL)
        self.nodes[node_id].wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM the nodes (they leave cleanly), then the hub; SIGKILL what lingers."""
        hubs = [self.hub] if self.hub else []
        for group in (list(self.nodes.values()), [*hubs, *self.replicas.values()]):
            for proc in group:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in group:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
