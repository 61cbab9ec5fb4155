"""The hub's storage layer: every SQL statement on the hub's tables is built in this package
(`tests/test_layers.py` checks the rest of `hub/` for statement constructors and session calls).

One module per group of tables, each a set of plain functions over a caller's `Session` or
`Connection` plus plain arguments; the caller owns the transaction, its locks and its commit,
and every decision:

- `rounds`: the round engine's snapshot reads and its effects written (`hub/engine.py`);
- `runs`, `nodes`, `versions`, `contributions`: rows by key and the service's reads and writes
  of runs and rounds, nodes and liveness, versions and downloads, assignments and
  contributions;
- `nonces`: the replay table of signed requests;
- `locks`: runs' row locks, the ticker lease's and migrations' advisory locks, `RoundWatch`'s
  reads;
- `trust`, `privacy`: reputations, audit seeds, screening and settlement; DP rounds, SecAgg
  sessions and stage messages;
- `registration`, `datasets`, `weights`, `upload_facts`, `reports`: the bounds on new
  identities, pushed datasets, pushed weights, an upload batch's facts, a run's report rows.

The ledger's chain keeps its own store (`ledger/log.py`): it is a component of its own, used
by the hub through `Ledger`.
"""
