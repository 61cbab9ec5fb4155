"""The hub's storage layer: every SQL statement on the hub's tables lives in this package.

One module per group of tables, each a set of plain functions over a caller's `Session` or
`Connection` (the caller owns the transaction, its locks and its commit): `rounds` turns the
round engine's effects (`hub/engine.py`) into SQL and reads the snapshots the engine decides on.
The rest of the hub (service, trust, privacy, reports, routes) composes these functions and holds
no SQL of its own; the ledger's chain keeps its own store (`ledger/log.py`).
"""
