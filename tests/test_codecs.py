import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gridswarm.train.codecs import ErrorFeedback, NonFinitePayload, check_payload, make_codec
from gridswarm.train.params import BlobFormatError, pack, unpack
from tests.examples import examples


@pytest.fixture
def vec():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(10_000, generator=g) * 1e-3
    v[17] = 0.05  # an outlier only costs its own block
    return v


@pytest.mark.parametrize(
    ("name", "rel_err", "bytes_per_value"),
    [("fp32", 0, 4), ("fp16", 1e-3, 2), ("int8", 2e-2, 1.02), ("int4", 0.2, 0.52)],
)
def test_roundtrip_error_and_size(vec, name, rel_err, bytes_per_value):
    codec = make_codec(name)
    tensors = codec.encode(vec)
    out = codec.decode(unpack(pack(tensors))[0], vec.numel())
    assert out.shape == vec.shape
    assert (out - vec).norm() <= rel_err * vec.norm() + 1e-12
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    assert payload <= bytes_per_value * vec.numel() + 4 * 64


def test_error_feedback_keeps_the_sum_unbiased(vec):
    codec = make_codec("int4")
    feedback = ErrorFeedback(codec)
    sent = sum(codec.decode(feedback.encode(vec), vec.numel()) for _ in range(50))
    plain = sum(codec.decode(codec.encode(vec), vec.numel()) for _ in range(50))
    truth = 50 * vec
    assert (sent - truth).norm() < 0.2 * (plain - truth).norm()


@pytest.mark.parametrize("name", ["fp32", "fp16", "int8", "int4"])
def test_malformed_payloads_are_refused(vec, name):
    codec = make_codec(name)
    tensors = codec.encode(vec)
    with pytest.raises(BlobFormatError):
        codec.decode(tensors, vec.numel() + 1000)
    with pytest.raises(BlobFormatError):
        codec.decode({}, vec.numel())


def test_unknown_codec():
    with pytest.raises(ValueError, match="unknown codec"):
        make_codec("int3")


def test_garbage_is_not_a_blob():
    with pytest.raises(BlobFormatError):
        unpack(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_non_finite_vectors_are_refused(name):
    with pytest.raises(ValueError, match="non-finite"):
        make_codec(name).encode(torch.tensor([1.0, float("nan")]))


def test_outer_update_moves_weights_by_what_nodes_decode():
    """The hub's close (`outer_update`): the weights move by exactly the published delta, and
    the residual carries the rounding to the next close (over rounds, the sum is unbiased)."""
    from gridswarm.train.outer import nesterov_step, outer_update

    torch.manual_seed(0)
    theta = torch.randn(4096)
    momentum = residual = None
    moved = torch.zeros(4096)
    exact = torch.zeros(4096)
    for _ in range(5):
        g = torch.randn(4096) * 1e-2
        out = outer_update(
            theta, g, momentum, residual, lr=0.7, mu=0.9, codec_down="int8", block_size=256
        )
        decoded = make_codec("int8", 256).decode(out.delta, 4096)
        assert torch.equal(out.theta, theta - decoded)  # what a node applying the delta gets
        exact += nesterov_step(g, momentum, 0.7, 0.9).update
        moved += decoded
        theta, momentum, residual = out.theta, out.momentum, out.residual
    assert torch.allclose(moved + residual, exact, atol=1e-5)


@settings(max_examples=examples(200), deadline=None)
@given(
    bits=st.sampled_from([8, 4]),
    n_blocks=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(min_value=0.0, max_value=3.4e38, allow_nan=False, allow_infinity=False),
)
def test_checking_a_payload_without_decoding_agrees_with_decoding(bits, n_blocks, seed, scale):
    """The hub checks an upload's values from its scales alone (`check_payload`): a payload
    passes exactly when decoding it gives finite values, for any q a sender may put there (int8
    -128 included) and scales up to float32's largest."""
    codec = make_codec(f"int{bits}", 32)
    numel = n_blocks * 32 - 5
    g = torch.Generator().manual_seed(seed)
    qdtype = torch.int8 if bits == 8 else torch.uint8
    q = torch.randint(
        -128 if bits == 8 else 0,
        128 if bits == 8 else 256,
        (n_blocks * 32 // (1 if bits == 8 else 2),),
        generator=g,
        dtype=torch.int16,
    ).to(qdtype)
    q[0] = -128 if bits == 8 else 0  # the largest magnitude a sender can encode
    scales = torch.full((n_blocks,), scale, dtype=torch.float32)
    payload = {"q": q, "scale": scales}
    finite = bool(torch.isfinite(codec.decode(payload, numel)).all())
    if finite:
        check_payload(codec, payload, numel)
    else:
        with pytest.raises(NonFinitePayload):
            check_payload(codec, payload, numel)
    for bad in (float("inf"), float("nan")):  # malformed, not merely overflowing
        with pytest.raises(BlobFormatError) as err:
            check_payload(codec, {"q": q, "scale": torch.full((n_blocks,), bad)}, numel)
        assert not isinstance(err.value, NonFinitePayload)
