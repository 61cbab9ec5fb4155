"""Starting a hub: open (and migrate) the database, open the blob store, and serve."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DisconnectionError

from gridswarm.blobs import open_blob_store
from gridswarm.hub.app import create_app
from gridswarm.hub.limits import replica_share
from gridswarm.hub.metrics import process_ended, use_multiprocess
from gridswarm.hub.service import HubService, HubSettings
from gridswarm.hub.store.locks import lock_migrations
from gridswarm.identity import Identity

MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger("gridswarm.hub")
MAX_WORKERS = 64
RESTART_WINDOW_S = 30.0  # a replica that died is restarted, unless this many died this recently:
MAX_RESTARTS_IN_WINDOW = 10  # then the hub stops (something is wrong with every start)
# a pooled PostgreSQL connection idle longer than this is pinged before use (a restarted server or
# a dropped idle connection); one in steady use is not: pinging every checkout cost a round trip
# per transaction, ~12 % of the hub's CPU at 1,000 nodes (bench/results/hub_load_cost.md)
IDLE_PING_S = 10.0
SQLITE_REPLICAS = "--workers > 1 needs PostgreSQL (--db postgresql://…): SQLite is one process"


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout and full fsync on commit."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if not url.startswith("sqlite"):
        return ping_when_idle(create_engine(url), IDLE_PING_S)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(conn, _record) -> None:
        cur = conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return engine


def ping_when_idle(engine: Engine, idle_s: float) -> Engine:
    """`pool_pre_ping` for connections idle over `idle_s` only: the dialect's ping (SELECT 1)
    on checkout; a dead connection is replaced before the transaction starts (SQLAlchemy's
    DisconnectionError protocol). A connection that dies while in steady use fails its one
    transaction (a 5xx that nodes retry), and the pool then replaces every older connection,
    as SQLAlchemy does on any disconnect."""

    @event.listens_for(engine, "checkin")
    def _idle_from(_dbapi_conn, record) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_conn, record, _proxy) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since <= idle_s:
            return  # new, or in steady use
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:
            raise DisconnectionError(f"pooled connection idle {idle_s:.0f}+ s is gone") from exc

    return engine


def alembic(engine: Engine, action: str, target: str) -> None:
    """Run an Alembic command (`upgrade`, `downgrade`, ...) to `target` on `engine`."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # replicas starting together migrate in turn
            lock_migrations(conn)
        cfg.attributes["connection"] = conn
        getattr(command, action)(cfg, target)


def migrate(engine: Engine) -> None:
    """Bring the database to the newest schema (Alembic `upgrade head`)."""
    alembic(engine, "upgrade", "head")


def hub_key_path(blobs: str | Path, home: Path | None = None) -> Path:
    """Where the hub keeps its Ed25519 ledger key: `home`/hub.key, by default beside a local blob
    folder (object storage has no "beside": there `home` is required)."""
    if home is not None:
        return Path(home) / "hub.key"
    if str(blobs).startswith("s3://"):
        raise ValueError("--home is required with --blobs s3://… (where the hub keeps hub.key)")
    return Path(blobs).resolve().parent / "hub.key"


def build_service(
    db_url: str,
    blobs: str | Path,
    settings: HubSettings | None = None,
    home: Path | None = None,
    clock: Callable[[], float] = time.time,
) -> HubService:
    """The hub's service over `db_url` and the blob store `blobs` (a folder or s3://bucket/prefix;
    the latter with a local verified cache in `home`/blob-cache for what the hub reads as files)."""
    engine = make_engine(db_url)
    migrate(engine)
    identity = Identity.load_or_create(hub_key_path(blobs, home))  # created once, then kept
    store = open_blob_store(blobs)
    if str(blobs).startswith("s3://"):
        from gridswarm.blobcache import CachedS3Store  # boto3 only when asked for

        cache_bytes = (settings or HubSettings()).blob_cache_bytes
        store = CachedS3Store(store, Path(home) / "blob-cache", cache_bytes)  # home: checked
    service = HubService(engine, store, settings, clock, identity=identity)
    service.trust.ensure_genesis()
    return service


# on SIGTERM, how long open connections may take to finish (a half-open TLS handshake, say)
GRACEFUL_SHUTDOWN_S = 5.0


def proxy_options(forwarded_allow_ips: str | None) -> dict[str, object]:
    """uvicorn's options for the client address: by default the peer address of the TCP
    connection, whatever X-Forwarded-For says (uvicorn itself would believe it from localhost);
    with `forwarded_allow_ips` (comma-separated proxy addresses, or "*") the client address the
    listed proxies put in X-Forwarded-For. The bound on new node identities per network
    (hub/registration.py) counts by this address: behind a proxy, give its address here."""
    if not forwarded_allow_ips:
        return {"proxy_headers": False, "forwarded_allow_ips": ""}
    return {"proxy_headers": True, "forwarded_allow_ips": forwarded_allow_ips}


def check_workers(db_url: str, workers: int) -> None:
    """ValueError (one line) unless `workers` replicas can share `db_url`."""
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"--workers must be in [1, {MAX_WORKERS}], got {workers}")
    if workers > 1 and make_engine(db_url).dialect.name == "sqlite":
        raise ValueError(SQLITE_REPLICAS)


def check_rate_share(settings: HubSettings) -> None:
    """ValueError (one line) unless each of the hub's processes gets a usable share of the
    per-key rate limit (hub/limits.py `replica_share`)."""
    replica_share(
        settings.requests_per_s, settings.request_burst, settings.replica_count * settings.workers
    )


def serve(
    db_url: str,
    blobs: str | Path,
    host: str,
    port: int,
    settings: HubSettings | None = None,
    home: Path | None = None,
    tls: tuple[Path, Path] | None = None,
    workers: int = 1,
    forwarded_allow_ips: str | None = None,
    metrics: bool = True,
) -> None:
    """Serve the hub; with `tls` = (certificate chain PEM, private key PEM) over HTTPS only; with
    `workers` > 1 as that many replica processes on one listening socket (PostgreSQL only);
    `forwarded_allow_ips`: the proxies whose X-Forwarded-For is believed (`proxy_options`);
    `metrics`: serve `GET /metrics` (hub/metrics.py; False: 404, nothing measured).
    Each process enforces its share of the per-key rate limit (`settings.replica_count` ×
    `workers` processes share it, hub/limits.py); ValueError if that share is under one request."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    check_workers(db_url, workers)
    settings = dataclasses.replace(settings or HubSettings(), workers=workers)
    check_rate_share(settings)
    if workers > 1:
        serve_replicas(
            db_url, blobs, host, port, workers, settings, home, tls, forwarded_allow_ips, metrics
        )
        return
    service = build_service(db_url, blobs, settings, home)
    certfile, keyfile = tls if tls is not None else (None, None)
    uvicorn.run(
        create_app(service, metrics=metrics),
        host=host,
        port=port,
        log_level="warning",
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        **proxy_options(forwarded_allow_ips),
    )


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket that forked replica processes share (the kernel hands each
    new connection to one of them)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve_replicas(
    db_url: str,
    blobs: str | Path,
    host: str,
    port: int,
    workers: int,
    settings: HubSettings | None = None,
    home: Path | None = None,
    tls: tuple[Path, Path] | None = None,
    forwarded_allow_ips: str | None = None,
    metrics: bool = True,
) -> None:
    """`gridswarm hub --workers N`: migrate, create the hub key and the ledger's genesis once,
    bind one socket, then fork N replica processes that each build their own service (own
    engine, own caches) and serve that socket. Any replica answers any request: they share
    the database (row locks, hub/replicas.py) and the blob store. A replica that dies is
    started again; SIGTERM/SIGINT stop them all. With `metrics`, the replicas keep their
    metrics in one temporary folder of this hub (prometheus_client's multiprocess mode,
    hub/metrics.py), so any replica's `/metrics` covers them all; removed when the hub stops."""
    import uvicorn

    build_service(db_url, blobs, settings, home).engine.dispose()  # schema, key, genesis
    sock = listening_socket(host, port)
    metrics_dir = tempfile.mkdtemp(prefix="gridswarm-hub-metrics-") if metrics else None
    if metrics_dir is not None:
        use_multiprocess(metrics_dir)
        log.info("the replicas' metrics in %s", metrics_dir)
    certfile, keyfile = tls if tls is not None else (None, None)

    def replica() -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        try:
            service = build_service(db_url, blobs, settings, home)
            config = uvicorn.Config(
                create_app(service, metrics=metrics),
                log_level="warning",
                ssl_certfile=certfile,
                ssl_keyfile=keyfile,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                **proxy_options(forwarded_allow_ips),
            )
            uvicorn.Server(config).run(sockets=[sock])
            code = 0
        except BaseException:
            log.exception("hub replica %d failed", os.getpid())
            code = 1
        logging.shutdown()
        os._exit(code)

    def start() -> int:
        pid = os.fork()
        if pid == 0:
            replica()
        log.info("hub replica started: pid %d", pid)
        return pid

    children = {start() for _ in range(workers)}
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    deaths: list[float] = []
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        children.discard(pid)
        process_ended(pid)  # its live gauges (requests in flight, ...) stop counting
        if stopping:
            continue
        now = time.monotonic()
        deaths = [t for t in deaths if now - t < RESTART_WINDOW_S] + [now]
        log.warning("hub replica %d ended (exit %d)", pid, os.waitstatus_to_exitcode(status))
        if len(deaths) > MAX_RESTARTS_IN_WINDOW:
            log.error("hub replicas keep dying: stopping the hub")
            stop(signal.SIGTERM, None)
            continue
        time.sleep(1.0)
        if not stopping:
            children.add(start())
    sock.close()
    if metrics_dir is not None:
        shutil.rmtree(metrics_dir, ignore_errors=True)
