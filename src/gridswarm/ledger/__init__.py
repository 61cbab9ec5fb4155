"""The ledger: who did what, who is owed what, and a record nobody can quietly rewrite.

- chain.py    entry format, signing scopes, checkpoint rule, streaming verifier (pure)
- merkle.py   sorted-pair Merkle trees, proofs, EVM reward leaves (pure)
- balances.py balances as a fold over entries (pure)
- log.py      the embedded ledger in the hub's SQL database (SQLite / PostgreSQL)
- evm.py      Vyper contracts (RewardToken, RunEscrow) driven through web3.py
- anvil.py    a local anvil node for tests, benchmarks and demos
- ops.py      what the CLI calls: ledger show/verify, run fund, node balance/claim, epochs, anchors
"""
