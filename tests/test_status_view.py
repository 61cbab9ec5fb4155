"""The operator's views, in process: `run status` lines, log levels, one-line error texts."""

from __future__ import annotations

import logging

import pytest
from rich.console import Console

from gridswarm.cli import _log_level, explain
from gridswarm.home import HomeInUse
from gridswarm.node.client import HubRequestError, HubUnreachable, check_hub_url
from gridswarm.report import bytes_line, loss_line, sparkline, status_table


def status(**overrides: object) -> dict:
    base = {
        "id": "r1",
        "name": "tiny",
        "status": "active",
        "status_reason": None,
        "round": 0,
        "version": 0,
        "val_loss": [5.5],
        "bytes_up_total": 0,
        "bytes_down_total": 0,
        "bytes_sync_dp_equivalent": 0,
        "liveness_s": 8.0,
        "nodes": [],
    }
    return base | overrides


def render(st: dict) -> str:
    console = Console(width=160, record=True)
    console.print(status_table(st))
    return console.export_text()


def test_nothing_to_compare_prints_no_ratio() -> None:
    text = render(status())
    assert "0×" not in text and "0 B — " not in text
    assert "no contribution yet" in text and "no round has closed yet" in text
    assert "no node has worked on this run yet" in text


def test_loss_per_round_and_node_states() -> None:
    nodes = [
        {"id": "a", "name": "x", "state": "live", "contributions": 3, "tokens": 3000,
         "bytes_up": 3000, "failures": 0, "last_failure": None},
        {"id": "b", "name": None, "state": "silent", "contributions": 0, "tokens": 0,
         "bytes_up": 0, "failures": 2, "last_failure": "MemoryError: does not fit"},
        {"id": "c", "name": None, "state": "gone", "contributions": 1, "tokens": 10,
         "bytes_up": 10, "failures": 0, "last_failure": None},
    ]  # fmt: skip
    st = status(
        status="stalled",
        status_reason="3 node failures",
        val_loss=[5.0, 4.0, 3.0, 3.5],
        version=3,
        bytes_up_total=3010,
        bytes_sync_dp_equivalent=301_000,
        nodes=nodes,
    )
    text = render(st)
    assert "stalled" in text and "reason: 3 node failures" in text
    assert "5.000 → 3.500 over 3 rounds" in text and sparkline([5.0, 4.0, 3.0, 3.5]) in text
    for state in ("live", "silent", "gone"):
        assert state in text
    assert "2 — MemoryError: does not fit" in text and "(100×)" in text


def test_sparkline_and_lines() -> None:
    assert sparkline([3.0, 2.0, 1.0]) == "█▅▁"
    assert sparkline([]) == "" and len(set(sparkline([2.0, 2.0]))) == 1
    assert loss_line([]) == "val loss: none yet"
    assert bytes_line(status(bytes_up_total=10)).endswith("B, down 0 B")  # no dp figure: no ratio


def test_verbosity_flags() -> None:
    assert _log_level(0, 0) == logging.INFO
    assert _log_level(1, 0) == logging.DEBUG and _log_level(3, 0) == logging.DEBUG
    assert _log_level(0, 1) == logging.WARNING and _log_level(0, 5) == logging.ERROR


def test_error_lines_say_what_to_do(tmp_path) -> None:
    down = explain(HubUnreachable("http://h:1", "connection refused", 5.0))
    assert down.startswith("cannot reach the hub at http://h:1 (connection refused)")
    assert "--hub" in down
    missing = explain(HubRequestError(404, "run x not found"))
    assert "run x not found" in missing and "`gridswarm run status` lists" in missing
    assert "own --home" in explain(HomeInUse(tmp_path, "123"))
    assert explain(RuntimeError("a bug")) is None  # not the user's mistake: a traceback
    with pytest.raises(ValueError) as bad:
        check_hub_url("localhost:8470")
    assert "did you mean http://localhost:8470?" in explain(bad.value)
    assert check_hub_url("https://hub.example/") == "https://hub.example"
