"""`gridswarm run create --init-from` at a real model size, against a real hub process.

Builds a GPT-2-shaped model (default: GPT-2 small's 12 layers × 768, with the byte vocabulary of
the bundled dataset: 86 M parameters, a 344 MB vector, pushed in 6 parts of 64 MiB), saves it
with `save_pretrained` as a sponsor has it, starts a hub, runs the CLI, and checks that the
run's version 0 is the model's flat vector bit for bit. Prints the wall time of each step.

    .venv/bin/python bench/init_from.py [--n-layer 12 --n-embd 768 --n-head 12]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gridswarm.identity import Identity
from gridswarm.node.client import HubClient
from gridswarm.protocol import API
from gridswarm.swarm import Swarm, free_port
from gridswarm.train.params import flatten, unpack_vector
from gridswarm.train.tokenizer import byte_tokenizer, save_for_transformers

RUN_TOML = """
name = "continued"
[train]
seq_len = 64
batch_size = 4
[data]
eval_batches = 2
[round]
max_nodes = 2
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--n-head", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import GPT2Config, GPT2LMHeadModel

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.monotonic()
        config = GPT2Config(
            vocab_size=256, n_positions=64, n_embd=args.n_embd, n_layer=args.n_layer,
            n_head=args.n_head, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        model = GPT2LMHeadModel(config)
        model.save_pretrained(root / "model")
        save_for_transformers(byte_tokenizer(), root / "model")
        theta = flatten(model)
        del model
        print(f"model: {theta.numel():,} parameters, {4 * theta.numel() / 2**20:,.0f} MiB fp32, "
              f"built and saved in {time.monotonic() - started:.1f} s")  # fmt: skip
        (root / "run.toml").write_text(RUN_TOML)
        swarm = Swarm(root / "swarm", free_port())
        swarm.workdir.mkdir()
        # the default push quota (256 MiB a key) is below this model: the operator raises it
        swarm.hub_extra = ["--max-run-memory-mb", "65536", "--max-dataset-mb-per-identity", "1024"]
        try:
            swarm.start_hub()
            started = time.monotonic()
            created = subprocess.run(
                [sys.executable, "-m", "gridswarm.cli", "run", "create", str(root / "run.toml"),
                 "--init-from", str(root / "model"), "--hub", swarm.url,
                 "--home", str(root / "home")],
                capture_output=True, text=True, timeout=1800,
            )  # fmt: skip
            wall = time.monotonic() - started
            print(created.stderr.strip())
            if created.returncode != 0:
                sys.exit(f"run create failed: {created.stdout}")
            run_id = created.stdout.strip().splitlines()[-1]
            print(f"run create --init-from: {wall:.1f} s (load, check, push, create_run)")
            client = HubClient(swarm.url, Identity.generate(), retry_for_s=10)
            path = f"{API}/runs/{run_id}/versions/latest"
            v0 = client.request("GET", path, signed=False).json()
            same = torch.equal(unpack_vector(client.blob(v0["weights_blob"])), theta)
            print(f"version 0 equals the model's vector: {same}; val_loss {v0['val_loss']:.4f}")
        finally:
            swarm.stop()


if __name__ == "__main__":
    main()
