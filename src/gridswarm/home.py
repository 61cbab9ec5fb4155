"""One process per home folder: a node's home holds its identity and model cache, and two node
processes sharing one would be the same node to the hub, racing each other's assignments.

`lock_home` takes an exclusive `flock` on `HOME/lock` (released by the kernel when the process
ends, however it ends) and writes the holder's pid into it so a refusal can name it. Several
nodes on one machine each need their own `--home`.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = "lock"


class HomeInUse(RuntimeError):
    """Another process holds the home folder."""

    def __init__(self, home: Path, holder_pid: str) -> None:
        pid = f" (pid {holder_pid})" if holder_pid else ""
        super().__init__(
            f"another node process{pid} is using {home}; give each node on this machine its "
            "own --home folder"
        )
        self.home = home


@contextmanager
def lock_home(home: Path) -> Iterator[None]:
    """Exclusive use of `home` for the life of the `with` block (HomeInUse if it is taken)."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(home / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            raise HomeInUse(home, holder) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
