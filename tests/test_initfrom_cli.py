"""`gridswarm run create RUN.toml --init-from DIR` against a real hub process: a sponsor's Hugging
Face folder (a small GPT-2 saved with `save_pretrained`, and a byte-level tokenizer) becomes the
run's version 0, bit for bit, and a node process that knows nothing new trains a round from it.
A RUN.toml that names another model ends in one error line and pushes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gridswarm.identity import Identity
from gridswarm.node.client import HubClient
from gridswarm.protocol import API
from gridswarm.swarm import Swarm, free_port
from gridswarm.train.params import flatten, unpack_vector
from gridswarm.train.tokenizer import byte_tokenizer, save_for_transformers
from tests.conftest import wait_for
from tests.test_cli_errors import cli, one_error_line

pytestmark = pytest.mark.slow
RUN_TOML = """
name = "continued"
seed = 11
[train]
seq_len = 32
batch_size = 8
inner_steps = 10
min_inner_steps = 2
[round]
deadline_s = 60
quorum = 1
min_nodes = 1
[budget]
rounds = 1
"""


def sponsor_model(folder: Path) -> torch.Tensor:
    """A small GPT-2 in Hugging Face layout, as a sponsor has it; its flat vector."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(5)
    config = GPT2Config(
        vocab_size=256, n_positions=32, n_embd=32, n_layer=1, n_head=2, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    assert config.resid_pdrop == 0.1  # a checkpoint's pretraining dropout: the run sets it to 0
    model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    save_for_transformers(byte_tokenizer(), folder)
    return flatten(model)


def blobs(swarm: Swarm) -> list[str]:
    return sorted(p.name for p in (swarm.workdir / "blobs").rglob("*") if p.is_file())


def test_run_create_init_from_a_folder_then_a_node_trains_from_it(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    theta = sponsor_model(tmp_path / "model")
    toml = tmp_path / "run.toml"
    toml.write_text(RUN_TOML)
    swarm = Swarm(tmp_path / "swarm", free_port())
    swarm.workdir.mkdir()
    try:
        swarm.start_hub()
        wrong = tmp_path / "wrong.toml"
        wrong.write_text(RUN_TOML + '[model]\nkind = "hf"\narchitecture = "llama"\n')
        before = blobs(swarm)
        line = one_error_line(
            cli(tmp_path, "run", "create", str(wrong), "--init-from", str(tmp_path / "model"),
                "--hub", swarm.url, timeout_s=180)
        )  # fmt: skip
        assert "model.architecture = 'llama'" in line and "gpt2" in line
        assert blobs(swarm) == before

        created = cli(
            tmp_path, "run", "create", str(toml), "--init-from", str(tmp_path / "model"),
            "--hub", swarm.url, timeout_s=180,
        )  # fmt: skip
        out = created.stdout + created.stderr
        assert created.returncode == 0, out
        assert "same vocabulary" in out and "pushed" in out and "dropout set to 0" in out
        run_id = created.stdout.strip().splitlines()[-1]
        client = HubClient(swarm.url, Identity.generate(), retry_for_s=10)
        status = client.run_status(run_id)
        assert status["config"]["model"]["architecture"] == "gpt2"
        assert status["config"]["model"]["hf_config"]["resid_pdrop"] == 0.0
        assert status["config"]["model"]["init_weights"].startswith("sha256:")
        v0 = client.request("GET", f"{API}/runs/{run_id}/versions/latest", signed=False).json()
        assert v0["number"] == 0
        assert torch.equal(unpack_vector(client.blob(v0["weights_blob"])), theta)

        swarm.start_node("n1", run_id)
        done = wait_for(
            lambda: (s := client.run_status(run_id))["version"] >= 1 and s, 240, "one round"
        )
        assert done["status"] == "finished", done
        v1 = client.request("GET", f"{API}/runs/{run_id}/versions/latest", signed=False).json()
        assert v1["number"] == 1 and v1["val_loss"] < v0["val_loss"]
    finally:
        swarm.stop()
