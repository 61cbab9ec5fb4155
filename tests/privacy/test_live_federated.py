"""Federated mode on a real swarm: nodes train on their own files (`--data`), a recording proxy
between nodes and hub sees every byte the hub receives, and none of it is training data."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from gridswarm.identity import Identity
from gridswarm.node.client import HubClient
from gridswarm.train.data import read_text
from tests.conftest import tiny_run, wait_for
from tests.privacy.wire import RecordingProxy, find_leaks, sample_ngrams

pytestmark = pytest.mark.slow


def private_text(node: int) -> tuple[str, list[str]]:
    """A data owner's file: a slice of English text with private records mixed in."""
    public = read_text("tinyshakespeare")
    chunk = public[node * 200_000 : node * 200_000 + 120_000]
    secrets_ = [
        f"CANARY-{node}-{secrets.token_hex(6)}: card 4929 1234 5678 {1000 + node}, "
        f"diagnosis Zorblatt syndrome, PIN {secrets.randbelow(10**6):06d}"
        for _ in range(3)
    ]
    parts = [chunk[i : i + 4000] for i in range(0, len(chunk), 4000)]
    text = "\n".join(p + "\n" + secrets_[k % 3] for k, p in enumerate(parts))
    return text, secrets_


def stored_files(workdir: Path, skip: set[str]) -> list[bytes]:
    """Everything the hub keeps on disk: its database (with WAL) and blob store, and its log."""
    return [
        p.read_bytes()
        for p in workdir.rglob("*")
        if p.is_file() and not (set(p.relative_to(workdir).parts) & skip)
    ]


def test_detector_finds_private_text_in_any_obvious_encoding():
    import base64

    needle = b"CANARY-0-abc: card 4929 1234 5678 1000"
    for blob in (
        b"x" * 7 + base64.b64encode(b"zz" + needle + b"yy") + b"--",
        b"\x00" * 5 + bytes(needle.decode().encode("utf-16-le")),
        b"ids" + b"".join(int(c).to_bytes(8, "little") for c in needle),
        b'{"x": "' + needle.hex().encode() + b'"}',
    ):
        assert find_leaks([blob], [needle]), blob[:40]
    assert find_leaks([b"nothing to see here" * 100], [needle]) == []


def test_federated_run_sends_no_training_data(make_swarm, tmp_path):
    swarm = make_swarm()
    swarm.start_hub()
    proxy = RecordingProxy(swarm.port)
    try:
        sponsor = HubClient(swarm.url, Identity.generate(), retry_for_s=30)
        config = tiny_run(
            data={"data": "local"},
            round={"deadline_s": 30, "quorum": 2, "min_nodes": 2},
            budget={"rounds": 2},
        )
        run_id = sponsor.create_run(config).run_id
        needles: list[bytes] = []
        for i in range(2):
            text, canaries = private_text(i)
            path = tmp_path / f"private{i}.txt"
            path.write_text(text)
            needles += [c.encode() for c in canaries] + [c[:20].encode() for c in canaries]
            needles += sample_ngrams(text.encode(), 24, 40, seed=i)
            swarm.start_node(f"owner{i}", run_id, extra=["--data", str(path)], hub_url=proxy.url)

        def finished():
            status = sponsor.run_status(run_id)
            return status if status["status"] == "finished" else None

        status = wait_for(finished, 90, "the federated run to finish")
        for proc in swarm.nodes.values():  # they leave through the proxy too
            proc.wait(timeout=30)
    finally:
        proxy.close()

    # Training on private files still improves the hub's public held-out loss.
    assert status["version"] == 2
    assert status["val_loss"][-1] < status["val_loss"][0] - 0.5
    assert all(n["contributions"] == 2 for n in status["nodes"]) and len(status["nodes"]) == 2
    assert status["privacy"]["data"] == "local"
    assert status["privacy"]["hub_eval_set"] == "tinyshakespeare"

    # Everything went through the proxy, and nothing of the nodes' files is in it.
    streams = proxy.streams()
    assert sum(s.count(b"/contributions") for s in streams) == 4
    assert proxy.bytes_to_hub > status["bytes_up_total"]
    assert len(needles) == 2 * (6 + 40)
    assert find_leaks(streams, needles) == []
    # Nor in what the hub stores (database, blobs, log).
    assert (
        find_leaks(
            stored_files(swarm.workdir, {"owner0", "owner1", "owner0.log", "owner1.log"}), needles
        )
        == []
    )
