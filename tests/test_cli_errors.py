"""What a new user meets: each mistake ends in one line saying what to do, a non-zero exit and no
traceback (`--debug` shows it); a node against a dead hub says so and stops at once on SIGTERM.
Every case runs the real CLI as a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gridswarm.home import lock_home
from gridswarm.swarm import Swarm, free_port
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GRIDSWARM_HUB", "GRIDSWARM_DEBUG")}
    return env | {
        "PYTHONPATH": str(REPO_ROOT / "src"),
        "GRIDSWARM_HOME": str(tmp_path / "home"),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        # rich wraps at the terminal's width (80 without one): a wide one keeps a long tmp path
        # (pytest-xdist's are longer) on one line, so the tests read the same wherever they run
        "COLUMNS": "240",
    }


def cli(tmp_path: Path, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gridswarm.cli", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=cli_env(tmp_path),
        timeout=timeout_s,
    )


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a failed command (asserting there is exactly one, and no
    traceback anywhere)."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    return errors[0]


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def test_unreachable_hub_sponsor_commands(tmp_path: Path) -> None:
    url = dead_url()
    line = one_error_line(
        cli(tmp_path, "run", "create", str(REPO_ROOT / "examples/run.toml"), "--hub", url)
    )
    assert f"cannot reach the hub at {url} (connection refused)" in line
    assert "gridswarm hub" in line and "--hub" in line


def test_hub_url_without_scheme(tmp_path: Path) -> None:
    line = one_error_line(cli(tmp_path, "run", "status", "abc", "--hub", "127.0.0.1:8470"))
    assert "did you mean http://127.0.0.1:8470?" in line


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    proc = cli(tmp_path, "run", "status", "abc", "--hub", "127.0.0.1:8470", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "HubURLError" in proc.stderr


def test_sample_of_a_missing_folder(tmp_path: Path) -> None:
    line = one_error_line(cli(tmp_path, "sample", "/nonexistent"))
    assert "no exported model in /nonexistent" in line and "gridswarm run export" in line


def test_unknown_run_status_and_export(tmp_path: Path) -> None:
    swarm = Swarm(tmp_path / "swarm", free_port())
    swarm.workdir.mkdir()
    try:
        swarm.start_hub()
        for args in (["run", "status", "nosuchrun"], ["run", "export", "nosuchrun", "out"]):
            line = one_error_line(cli(tmp_path, *args, "--hub", swarm.url))
            assert "the hub refused (404): run nosuchrun not found" in line
            assert "`gridswarm run status` lists" in line
        listed = cli(tmp_path, "run", "status", "--hub", swarm.url)
        assert listed.returncode == 0, listed.stderr
        assert not (tmp_path / "home" / "sponsor.key").exists()  # reading creates no key
        line = one_error_line(cli(tmp_path, "run", "stop", "nosuchrun", "--hub", swarm.url))
        assert "run nosuchrun not found" in line
    finally:
        swarm.stop()


def test_node_without_hub_says_which_and_a_shared_home_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "node-home"
    with lock_home(home):  # as if another node process were running with this home
        proc = cli(tmp_path, "node", "--home", str(home), "--connect-timeout", "1")
    assert "no --hub given: using http://127.0.0.1:8470" in proc.stderr
    line = one_error_line(proc)
    assert f"another node process (pid {os.getpid()}) is using {home}" in line
    assert "own --home" in line


def test_node_gives_up_after_connect_timeout(tmp_path: Path) -> None:
    url = dead_url()
    proc = cli(tmp_path, "node", "--hub", url, "--connect-timeout", "2", "--home", "h")
    assert "retrying in" in proc.stderr and "giving up in" in proc.stderr  # the countdown
    line = one_error_line(proc)
    assert f"cannot reach the hub at {url} (connection refused)" in line


def test_node_against_a_dead_port_stops_within_5_s_of_sigterm(tmp_path: Path) -> None:
    url = dead_url()
    with open(tmp_path / "node.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gridswarm.cli", "node", "--hub", url, "--home", "h"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=cli_env(tmp_path),
        )
    try:
        deadline = time.monotonic() + 60
        while "cannot reach the hub" not in (tmp_path / "node.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "no retry message"
            time.sleep(0.1)
        time.sleep(1.0)  # let it back off into a longer wait
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
        assert time.monotonic() - sent < 5.0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = (tmp_path / "node.log").read_text()
    assert code == 0 and "Traceback" not in out, out


def test_hub_epoch_posting_needs_its_chain_and_a_bounded_interval(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'hub.db'}"
    alone = one_error_line(cli(tmp_path, "hub", "--db", db, "--epoch-every-s", "60"))
    assert "--epoch-every-s needs --rpc, --token, --escrow and --eth-key" in alone
    (tmp_path / "hub.eth").write_text("11" * 32)
    chain = ["--rpc", dead_url(), "--token", "0x1", "--escrow", "0x2"]
    chain += ["--eth-key", str(tmp_path / "hub.eth")]
    line = one_error_line(cli(tmp_path, "hub", "--db", db, "--epoch-every-s", "nan", *chain))
    assert "--epoch-every-s must be between 10 and" in line
