"""`gridswarm data push` against a real hub process: the push prints `manifest:<sha256>`, a second
push moves nothing, `gridswarm run create` accepts the pushed dataset, and a dataset over the
hub's `--max-dataset-mb` ends in one error line and stores nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from gridswarm.node.client import HubClient
from gridswarm.swarm import Swarm, free_port
from gridswarm.train.dataset import prepare
from tests.test_cli_errors import cli, one_error_line

pytestmark = pytest.mark.slow
SHAKESPEARE = Path(__file__).resolve().parent.parent / "src/gridswarm/data/tinyshakespeare.txt"
RUN_TOML = """
name = "pushed"
[data]
dataset = "{dataset}"
[model]
n_layer = 1
n_head = 2
n_embd = 32
[train]
seq_len = 32
batch_size = 8
inner_steps = 20
min_inner_steps = 2
[round]
deadline_s = 30
quorum = 1
min_nodes = 1
[budget]
rounds = 1
"""


def test_data_push_then_run_create(tmp_path: Path) -> None:
    small_src, big_src = tmp_path / "small.txt", tmp_path / "big.txt"
    small_src.write_bytes(SHAKESPEARE.read_bytes()[:40_000])
    big_src.write_bytes(SHAKESPEARE.read_bytes()[:600_000])  # 1.2 MB of uint16 tokens
    _, digest = prepare(
        [small_src], "bytes", tmp_path / "small", shard_tokens=4096, show_progress=False
    )
    prepare([big_src], "bytes", tmp_path / "big", shard_tokens=1 << 16, show_progress=False)
    swarm = Swarm(tmp_path / "swarm", free_port())
    swarm.workdir.mkdir()
    swarm.hub_extra = ["--max-dataset-mb", "1"]
    try:
        swarm.start_hub()
        pushed = cli(tmp_path, "data", "push", str(tmp_path / "small"), "--hub", swarm.url)
        assert pushed.returncode == 0, pushed.stdout + pushed.stderr
        assert pushed.stdout.strip().splitlines()[-1] == f"manifest:{digest}"
        assert "sent 11 blobs" in pushed.stdout and "Traceback" not in pushed.stderr
        again = cli(tmp_path, "data", "push", str(tmp_path / "small"), "--hub", swarm.url)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "sent 0 blobs (0 bytes), 11 already on the hub" in again.stdout

        toml = tmp_path / "run.toml"
        toml.write_text(RUN_TOML.format(dataset=f"manifest:{digest}"))
        created = cli(tmp_path, "run", "create", str(toml), "--hub", swarm.url)
        assert created.returncode == 0, created.stdout + created.stderr
        run_id = created.stdout.strip().splitlines()[-1]
        status = HubClient(swarm.url, None, retry_for_s=10).run_status(run_id)
        assert status["config"]["data"]["dataset"] == f"manifest:{digest}"

        blobs = sorted(p.name for p in (swarm.workdir / "blobs").rglob("*") if p.is_file())
        line = one_error_line(
            cli(tmp_path, "data", "push", str(tmp_path / "big"), "--hub", swarm.url)
        )
        assert "the hub refused (413)" in line and "--max-dataset-mb" in line
        assert sorted(p.name for p in (swarm.workdir / "blobs").rglob("*") if p.is_file()) == blobs
    finally:
        swarm.stop()
