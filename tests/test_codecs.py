import pytest
import torch

from gridswarm.train.codecs import ErrorFeedback, make_codec
from gridswarm.train.params import BlobFormatError, pack, unpack


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
