#!/usr/bin/env bash
# One prepared check for a machine with a CUDA GPU (not runnable without one; CI needs none):
#   1. the CUDA tests (tests/test_device.py: bf16 training tracks CPU fp32, ...)
#   2. the GPU node's tokens/s against a plain torch loop on that GPU, on the 125 M Llama of
#      examples/run_125m.toml (its batch, micro-batches, activation checkpointing; target >= 90 %)
#   3. a 125 M run with one GPU node and two CPU nodes (hub + 3 node processes on loopback):
#      rounds done, tokens per node (H follows each node's measured speed), peak RSS
# Results land in bench/results/gpu_*.{json,md}. Usage: bench/gpu_check.sh  (PYTHON=... to choose)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export PYTHONPATH=src
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to $PY (or no torch); nothing run" >&2
    exit 2
fi
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")'
echo "== 1. CUDA tests"
timeout 300 "$PY" -m pytest tests/test_device.py -q -rs
echo "== 2. GPU node vs plain torch loop (125 M)"
timeout 600 "$PY" bench/node_overhead.py --config examples/run_125m.toml --device cuda \
    --steps 10 --trials 3 --threads 4 --out bench/results/gpu_node_overhead.json
echo "== 3. 125 M run: 1 GPU node + 2 CPU nodes"
timeout 900 "$PY" bench/scale_125m.py --nodes 3 --gpu-nodes 1 --rounds 2 --steps 4 \
    --out bench/results/gpu_scale_125m.json
echo "gpu_check: done; see bench/results/gpu_*.md"
