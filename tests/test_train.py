"""Training core: deterministic replay, real learning, the outer optimizer, HF models."""

import torch

from gridswarm.config import parse_run_config
from gridswarm.export import export_theta, load_exported
from gridswarm.train.outer import nesterov_step
from gridswarm.train.tokenizer import byte_tokenizer
from gridswarm.train.workload import Workload
from tests.conftest import tiny_run


def test_replay_is_bit_identical_and_slices_differ_per_node():
    cfg = parse_run_config(tiny_run())
    a, b = Workload.from_config(cfg), Workload.from_config(cfg)
    theta = a.initial_theta()
    first = a.train(theta, round_number=3, node_id="node-a", steps=5)
    replay = b.train(theta.clone(), round_number=3, node_id="node-a", steps=5)
    other = b.train(theta.clone(), round_number=3, node_id="node-b", steps=5)
    assert torch.equal(first.pseudo_gradient, replay.pseudo_gradient)
    assert first.loss_last == replay.loss_last
    assert not torch.equal(first.pseudo_gradient, other.pseudo_gradient)


def test_diloco_rounds_lower_held_out_loss():
    cfg = parse_run_config(tiny_run())
    w = Workload.from_config(cfg)
    theta, momentum = w.initial_theta(), None
    start = w.evaluate(theta)
    for r in range(3):
        grads = [w.train(theta, r, f"n{i}", 20).pseudo_gradient for i in range(2)]
        step = nesterov_step(torch.stack(grads).mean(0), momentum, 0.7, 0.9)
        theta, momentum = theta - step.update, step.momentum
    assert w.evaluate(theta) < start - 1.0


def test_outer_step_matches_torch_sgd_nesterov():
    p = torch.nn.Parameter(torch.zeros(5))
    opt = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True)
    theta, momentum = torch.zeros(5), None
    for i in range(3):
        g = torch.arange(5.0) * (i + 1)
        p.grad = g.clone()
        opt.step()
        step = nesterov_step(g, momentum, 0.7, 0.9)
        theta, momentum = theta - step.update, step.momentum
    assert torch.allclose(theta, p.detach())


def test_hf_llama_trains_and_exports_loadable_by_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = parse_run_config(
        tiny_run(
            model={
                "kind": "hf",
                "architecture": "llama",
                "hf_config": {
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "num_key_value_heads": 1,
                },
            }
        )
    )
    w = Workload.from_config(cfg)
    theta = w.initial_theta()
    result = w.train(theta, 0, "n", 10)
    assert result.loss_last < result.loss_first
    theta = theta - result.pseudo_gradient
    export_theta(cfg, theta, tmp_path, {"version": 1}, byte_tokenizer())
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    ours = load_exported(tmp_path).model
    x = torch.randint(0, 256, (1, 16))
    assert torch.allclose(hf(input_ids=x).logits, ours(x), atol=1e-5)
