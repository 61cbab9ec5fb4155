"""Training on a device: micro-batches equal the full batch, the memory fit, activation
checkpointing, device choice; the CUDA paths run where CUDA is present."""

import pytest
import torch

from gridswarm.config import parse_run_config
from gridswarm.node.probe import hardware, probe_speed
from gridswarm.train.device import resolve_device
from gridswarm.train.workload import Workload
from tests.conftest import tiny_run

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def _workload(**train: object) -> Workload:
    return Workload.from_config(parse_run_config(tiny_run(train={**tiny_run()["train"], **train})))


def test_micro_batches_equal_the_full_batch_up_to_float_rounding():
    full, micro = _workload(), _workload(micro_batch_size=3)  # 8 rows as 3 + 3 + 2
    theta = full.initial_theta()
    a = full.train(theta, 1, "n", steps=4)
    b = micro.train(theta, 1, "n", steps=4)
    assert (a.micro_batch_size, b.micro_batch_size) == (8, 3)
    assert torch.allclose(a.pseudo_gradient, b.pseudo_gradient, rtol=1e-4, atol=1e-6)
    assert abs(a.loss_mean - b.loss_mean) < 1e-5
    assert not torch.equal(a.pseudo_gradient, torch.zeros_like(a.pseudo_gradient))


def test_one_micro_batch_holding_the_batch_is_bit_identical_and_replays():
    w = _workload(micro_batch_size=2)
    theta = w.initial_theta()
    assert torch.equal(
        w.train(theta, 0, "n", 3, micro_batch_size=8).pseudo_gradient,
        _workload().train(theta, 0, "n", 3).pseudo_gradient,
    )
    again = w.train(theta, 0, "n", 3).pseudo_gradient
    assert torch.equal(w.train(theta, 0, "n", 3).pseudo_gradient, again)


def test_activation_checkpointing_gives_the_same_update():
    plain, ckpt = _workload(), _workload(activation_checkpointing=True)
    theta = plain.initial_theta()
    a, b = plain.train(theta, 0, "n", 3), ckpt.train(theta, 0, "n", 3)
    assert torch.allclose(a.pseudo_gradient, b.pseudo_gradient, atol=1e-6)
    assert ckpt.model.activation_checkpointing


def test_out_of_memory_halves_the_micro_batch_until_it_fits():
    w = _workload()
    theta = w.initial_theta()
    seen: list[int] = []

    def small_memory(_step: int, _loss: float) -> None:  # a device that fits 2 rows at a time
        size = w.model.last_rows
        seen.append(size)
        if size > 2:
            raise torch.OutOfMemoryError("emulated: too many rows")

    forward = w.model.forward

    def recording_forward(idx):
        w.model.last_rows = idx.shape[0]
        return forward(idx)

    w.model.forward = recording_forward
    result = w.train(theta, 0, "n", 2, on_step=small_memory, fit_memory=True)
    assert result.micro_batch_size == 2 and seen[:2] == [8, 4]
    reference = _workload().train(theta, 0, "n", 2, micro_batch_size=2)
    assert torch.equal(result.pseudo_gradient, reference.pseudo_gradient)
    with pytest.raises(torch.OutOfMemoryError):
        w.train(theta, 0, "n", 2, on_step=small_memory)  # without fit_memory it is raised


def test_micro_batch_larger_than_the_batch_is_refused():
    with pytest.raises(ValueError, match="micro_batch_size"):
        parse_run_config(tiny_run(train={**tiny_run()["train"], "micro_batch_size": 9}))


def test_device_choice():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.backends.mps.is_available():
        assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "cuda:x", "cuda:-1", f"cuda:{torch.cuda.device_count()}"):
        with pytest.raises(ValueError, match="device"):
            resolve_device(bad)


@needs_cuda
def test_cuda_bf16_training_tracks_cpu_fp32():
    cpu, gpu = _workload(), _workload().to(torch.device("cuda"))
    theta = cpu.initial_theta()
    a, b = cpu.train(theta, 0, "n", 5), gpu.train(theta, 0, "n", 5, micro_batch_size=4)
    assert b.pseudo_gradient.device.type == "cpu"
    rel = (a.pseudo_gradient - b.pseudo_gradient).norm() / a.pseudo_gradient.norm()
    assert rel < 0.1, rel
    assert abs(a.loss_mean - b.loss_mean) < 0.05
    assert abs(gpu.evaluate(theta) - cpu.evaluate(theta)) < 0.05


def test_probe_measures_the_runs_own_model_and_reports_the_device():
    w = _workload(micro_batch_size=4)
    tokens_per_s, numel = probe_speed(w.model, w.cfg.train, torch.device("cpu"), steps=1)
    assert numel == w.numel and tokens_per_s > 0
    hw = hardware(torch.device("cpu"))
    assert hw.device == "cpu" and hw.device_memory_gb == hw.memory_gb > 0


def test_llama_micro_batches_and_checkpointing_match_the_plain_step():
    llama = {
        "kind": "hf",
        "architecture": "llama",
        "hf_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
    }
    train = tiny_run()["train"]
    plain = Workload.from_config(parse_run_config(tiny_run(model=llama)))
    lean = Workload.from_config(
        parse_run_config(
            tiny_run(
                model=llama,
                train={**train, "micro_batch_size": 4, "activation_checkpointing": True},
            )
        )
    )
    theta = plain.initial_theta()
    a, b = plain.train(theta, 0, "n", 3), lean.train(theta, 0, "n", 3)
    assert torch.allclose(a.pseudo_gradient, b.pseudo_gradient, rtol=1e-4, atol=1e-6)
    assert lean.model.hf.is_activation_checkpointing
