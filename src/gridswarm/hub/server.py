"""Starting a hub: open (and migrate) the database, open the blob store, and serve."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event

from gridswarm.blobs import open_blob_store
from gridswarm.hub.app import create_app
from gridswarm.hub.service import HubService, HubSettings
from gridswarm.identity import Identity

MIGRATIONS = Path(__file__).parent / "migrations"


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout and full fsync on commit."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(conn, _record) -> None:
        cur = conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return engine


def alembic(engine: Engine, action: str, target: str) -> None:
    """Run an Alembic command (`upgrade`, `downgrade`, ...) to `target` on `engine`."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
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

        store = CachedS3Store(store, Path(home) / "blob-cache")  # home: checked by hub_key_path
    service = HubService(engine, store, settings, clock, identity=identity)
    service.trust.ensure_genesis()
    return service


def serve(
    db_url: str,
    blobs: str | Path,
    host: str,
    port: int,
    settings: HubSettings | None = None,
    home: Path | None = None,
    tls: tuple[Path, Path] | None = None,
) -> None:
    """Serve the hub; with `tls` = (certificate chain PEM, private key PEM) over HTTPS only."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    service = build_service(db_url, blobs, settings, home)
    certfile, keyfile = tls if tls is not None else (None, None)
    uvicorn.run(
        create_app(service),
        host=host,
        port=port,
        log_level="warning",
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
    )
