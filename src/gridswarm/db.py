"""The declarative base every table of the hub's database hangs off (Alembic reads its metadata)."""

from __future__ import annotations

from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    """Base class of all ORM tables (hub state, ledger)."""
