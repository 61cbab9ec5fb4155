"""Pure trust logic: reward split, audit rate, reputation (data in, decisions out; no I/O)."""
