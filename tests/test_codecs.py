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


def whole_vector_outer_step(theta, g, momentum, residual, *, lr, mu, codec_down, block_size):
    """The outer step as one operation per whole vector (`nesterov_step`, then `ErrorFeedback`
    and the weights moved by the decoded delta): what the hub computed before it worked in
    pieces, kept here as the reference the pieces must reproduce bit for bit."""
    from gridswarm.train.outer import nesterov_step

    step = nesterov_step(g, momentum, lr, mu)
    feedback = ErrorFeedback(make_codec(codec_down, block_size), residual)
    encoded = feedback.encode(step.update)
    theta_new = theta - feedback.codec.decode(encoded, theta.numel())
    return theta_new, encoded, step.momentum, feedback.residual


@settings(max_examples=examples(150), deadline=None)
@given(
    codec=st.sampled_from(["fp32", "fp16", "int8", "int4"]),
    block_size=st.sampled_from([2, 4, 16]),
    numel=st.integers(1, 300),
    chunk_values=st.integers(1, 96),
    first_round=st.booleans(),
    fragment=st.one_of(st.none(), st.tuples(st.integers(0, 299), st.integers(1, 300))),
    seed=st.integers(0, 2**31 - 1),
)
def test_the_outer_step_in_pieces_is_the_whole_vector_step_bit_for_bit(
    codec, block_size, numel, chunk_values, first_round, fragment, seed
):
    """`outer_update_` (in place, piece by piece) gives exactly the bits of the step over the
    whole vector: weights, momentum, residual and the published delta, with and without a
    momentum and residual yet, for every built-in down-codec and Streaming fragments."""
    from gridswarm.train.outer import outer_update_

    if fragment is not None:
        fragment = (min(fragment[0], numel - 1), min(max(fragment), numel))
        if fragment[0] >= fragment[1]:
            fragment = None
    start, end = fragment or (0, numel)
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(numel, generator=gen)
    g = torch.randn(end - start, generator=gen) * 1e-2
    g[:: max(1, numel // 7)] = -0.0  # signed zeros must come out as the whole step makes them
    momentum = None if first_round else torch.randn(numel, generator=gen)
    residual = None if first_round else torch.randn(numel, generator=gen) * 1e-3
    knobs = {"lr": 0.7, "mu": 0.9, "codec_down": codec, "block_size": block_size}

    def part(v):
        return None if v is None else v[start:end]

    want_theta, want_delta, want_m, want_r = theta.clone(), None, None, None
    sliced = whole_vector_outer_step(theta[start:end], g, part(momentum), part(residual), **knobs)
    want_theta[start:end] = sliced[0]
    want_delta = sliced[1]
    want_m = torch.zeros(numel) if momentum is None else momentum.clone()
    want_r = torch.zeros(numel) if residual is None else residual.clone()
    want_m[start:end], want_r[start:end] = sliced[2], sliced[3]

    out = outer_update_(
        theta.clone(),
        g,
        None if momentum is None else momentum.clone(),
        None if residual is None else residual.clone(),
        fragment=fragment,
        chunk_values=chunk_values,
        **knobs,
    )

    def same_bits(a, b):
        return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))

    assert same_bits(out.theta, want_theta)
    assert same_bits(out.momentum, want_m)
    assert same_bits(out.residual, want_r)
    assert sorted(out.delta) == sorted(want_delta)
    assert all(same_bits(out.delta[k], want_delta[k]) for k in want_delta)


def test_the_outer_step_updates_the_hubs_vectors_in_place():
    """The hub's close gives its freshly read weights, momentum and residual to `outer_update_`:
    no model-sized copies of them are made, the results are those very tensors."""
    from gridswarm.train.outer import outer_update, outer_update_

    theta, momentum, residual = torch.randn(1000), torch.randn(1000), torch.zeros(1000)
    g = torch.randn(1000) * 1e-2
    knobs = {"lr": 0.7, "mu": 0.9, "codec_down": "int8", "block_size": 16}
    copied = outer_update(theta, g, momentum, residual, **knobs)
    ptrs = [t.data_ptr() for t in (theta, momentum, residual)]
    out = outer_update_(theta, g, momentum, residual, chunk_values=64, **knobs)
    assert [t.data_ptr() for t in (out.theta, out.momentum, out.residual)] == ptrs
    assert torch.equal(out.theta, copied.theta) and torch.equal(out.residual, copied.residual)
