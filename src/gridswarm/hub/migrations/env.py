"""Alembic environment: migrations run on the connection (or URL) the hub hands over."""

import contextlib

from alembic import context
from sqlalchemy import engine_from_config, pool

import gridswarm.hub.models
from gridswarm.db import Base

with contextlib.suppress(ImportError):  # the ledger's tables, once that package has them
    import gridswarm.ledger.log  # noqa: F401

config = context.config
connection = config.attributes.get("connection")

if connection is not None:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
