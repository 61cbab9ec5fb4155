"""A local anvil node (Foundry) on 127.0.0.1 for tests, benchmarks and demos of EVM settlement.

`find_anvil` looks at $GRIDSWARM_ANVIL, then PATH, then the npm cache directory
(~/.cache/gridswarm/anvil, from `npm install @foundry-rs/anvil-linux-amd64`), and can run that
npm install itself. `Anvil` starts the binary on a free port, waits until it answers JSON-RPC, and
stops it by pid.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import httpx
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

ANVIL_NPM_PACKAGE = "@foundry-rs/anvil-linux-amd64@1.7.1"
ANVIL_CACHE_DIR = Path.home() / ".cache" / "gridswarm" / "anvil"
_NPM_BIN = Path("node_modules") / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"


class AnvilNotFoundError(RuntimeError):
    """No anvil binary, and installing it failed."""


def install_anvil(cache_dir: Path = ANVIL_CACHE_DIR, timeout_s: float = 120.0) -> Path:
    """`npm install` the anvil package into `cache_dir`; returns the binary's path."""
    npm = shutil.which("npm")
    if npm is None:
        raise AnvilNotFoundError("anvil is not installed and npm is not on PATH to install it")
    cache_dir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--prefix", str(cache_dir), ANVIL_NPM_PACKAGE],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    binary = cache_dir / _NPM_BIN
    if result.returncode != 0 or not binary.exists():
        raise AnvilNotFoundError(
            f"npm install {ANVIL_NPM_PACKAGE} failed (rc {result.returncode}): "
            f"{result.stderr.strip()[-500:]}"
        )
    return binary


def find_anvil(install: bool = False, cache_dir: Path = ANVIL_CACHE_DIR) -> Path:
    """Path of an anvil binary; with `install`, npm-install it when none is found."""
    candidates = [os.environ.get("GRIDSWARM_ANVIL"), shutil.which("anvil"), cache_dir / _NPM_BIN]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    if install:
        return install_anvil(cache_dir)
    raise AnvilNotFoundError(
        f"anvil not found ($GRIDSWARM_ANVIL, PATH, {cache_dir / _NPM_BIN}); install it with "
        f"`npm install --prefix {cache_dir} {ANVIL_NPM_PACKAGE}`"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Anvil:
    """A running anvil node; use as a context manager. `url` is its JSON-RPC endpoint."""

    def __init__(
        self,
        binary: Path | None = None,
        port: int | None = None,
        block_time_s: float | None = None,
        startup_timeout_s: float = 20.0,
    ) -> None:
        self.binary = binary or find_anvil()
        self.port = port or free_port()
        self.block_time_s = block_time_s
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Anvil:
        cmd = [str(self.binary), "--host", "127.0.0.1", "--port", str(self.port), "--silent"]
        if self.block_time_s is not None:
            cmd += ["--block-time", str(self.block_time_s)]
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + self.startup_timeout_s
        body = {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"anvil exited with {self.process.returncode}: {err[-500:]}")
            try:
                if httpx.post(self.url, json=body, timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"anvil did not answer on {self.url} within {self.startup_timeout_s} s")

    def stop(self) -> None:
        """Terminate this anvil process (by its pid), then kill it if it lingers."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.process.stderr:
            self.process.stderr.close()
        self.process = None

    def __enter__(self) -> Anvil:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def funded_account(w3: Web3, wei: int = 10**20) -> LocalAccount:
    """A fresh key whose address anvil credits with `wei` (anvil_setBalance; test chains only)."""
    account = Account.create()
    w3.provider.make_request("anvil_setBalance", [account.address, hex(wei)])
    return account
