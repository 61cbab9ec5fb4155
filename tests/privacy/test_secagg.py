"""SecAgg+: exact sums, uniform-looking inputs, dropout recovery and refusal, protocol errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from gridswarm.privacy.secagg import (
    SecAggClient,
    SecAggConfig,
    SecAggDropoutError,
    SecAggError,
    SecAggServer,
    ShareDelivery,
    Stage,
    UnmaskRequest,
    decode_message,
    dequantize,
    encode_message,
    make_config,
    prg,
    quantize,
    simulate_round,
)

torch.set_num_threads(1)
D = 2000


def ids(n: int) -> list[str]:
    return [f"node-{i:02d}" for i in range(n)]


def updates_for(config: SecAggConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {nid: 0.3 * torch.randn(config.vector_length, generator=g) for nid in config.node_ids}


def expected_sum(config: SecAggConfig, updates, members) -> np.ndarray:
    total = np.zeros(config.vector_length, dtype=np.uint32)
    for nid in members:
        total += quantize(updates[nid], config)
    return total


def test_prg_is_chacha20_rfc7539_vector() -> None:
    # RFC 7539 A.1 test vector 1: all-zero key and nonce, block counter 0.
    words = prg(bytes(32), 4)
    assert words.tobytes().hex() == "76b8e0ada0f13d90405d6ae55386bd28"


def test_quantize_roundtrip_and_clipping() -> None:
    cfg = make_config("s", ids(4), 5, n_neighbours=2, max_dropouts=1, clip_range=2.0)
    x = torch.tensor([0.5, -1.25, 3.0, -7.0, 1e-9])
    back = dequantize(quantize(x, cfg), cfg)
    assert torch.allclose(back, torch.tensor([0.5, -1.25, 2.0, -2.0, 0.0]), atol=1 / cfg.scale)
    assert cfg.scale * 2.0 * 4 <= 2**31 - 1 < cfg.scale * 2 * 2.0 * 4


def test_unmasked_sum_is_exact() -> None:
    cfg = make_config("run-a/1", ids(12), D, n_neighbours=4, max_dropouts=1)
    ups = updates_for(cfg)
    result = simulate_round(cfg, ups)
    assert np.array_equal(result.integer_sum, expected_sum(cfg, ups, cfg.node_ids))
    clipped = torch.stack(list(ups.values())).double().clamp(-cfg.clip_range, cfg.clip_range)
    true_sum = clipped.sum(0)
    assert (result.total.double() - true_sum).abs().max() <= 12 / (2 * cfg.scale) + 1e-6
    assert result.survivors == tuple(cfg.node_ids) and result.dropped == ()


def test_complete_graph_is_classic_secagg() -> None:
    cfg = make_config("run-a/2", ids(5), D, n_neighbours=100, max_dropouts=2)
    assert cfg.degree == 4 and cfg.threshold == 3
    ups = updates_for(cfg, seed=1)
    result = simulate_round(cfg, ups, drop_before={"node-01": Stage.MASK})
    members = [n for n in cfg.node_ids if n != "node-01"]
    assert np.array_equal(result.integer_sum, expected_sum(cfg, ups, members))


def test_what_the_hub_sees_of_one_node_is_uniform() -> None:
    cfg = make_config("run-a/3", ids(6), 40_000, n_neighbours=2, max_dropouts=1)
    clients = {n: SecAggClient(cfg, n) for n in cfg.node_ids}
    server = SecAggServer(cfg)
    broadcasts = server.collect_keys([c.advertise_keys() for c in clients.values()])
    deliveries = server.collect_shares([clients[n].share_keys(b) for n, b in broadcasts.items()])
    secret = torch.zeros(cfg.vector_length)
    secret[::2] = 0.9  # a very non-uniform input: two distinct values
    masked = clients["node-00"].mask_input(deliveries["node-00"], secret)
    words = np.frombuffer(masked.masked, dtype="<u4")

    def p_values(w: np.ndarray) -> tuple[float, float]:
        counts = np.bincount(w >> 24, minlength=256)  # top byte: 256 equiprobable bins
        chi2 = stats.chisquare(counts).pvalue
        ks = stats.kstest(w / 2.0**32, "uniform").pvalue
        return float(chi2), float(ks)

    chi2_p, ks_p = p_values(words)
    assert chi2_p > 1e-4 and ks_p > 1e-4
    plain_chi2, plain_ks = p_values(quantize(secret, cfg))  # the same tests do see plain data
    assert plain_chi2 < 1e-12 and plain_ks < 1e-12


@pytest.mark.parametrize(
    "stage",
    [Stage.SHARE, Stage.MASK, Stage.UNMASK],
    ids=["before-share", "after-share", "after-mask"],
)
def test_t_dropouts_are_recovered(stage: Stage) -> None:
    cfg = make_config("run-b/1", ids(14), D, n_neighbours=6, max_dropouts=3)
    ups = updates_for(cfg, seed=2)
    # Worst case: the dropped nodes are all neighbours of one node.
    victim = cfg.node_ids[0]
    dropped = cfg.neighbours(victim)[:3]
    result = simulate_round(cfg, ups, drop_before=dict.fromkeys(dropped, stage))
    in_sum = [n for n in cfg.node_ids if stage is Stage.UNMASK or n not in dropped]
    assert np.array_equal(result.integer_sum, expected_sum(cfg, ups, in_sum))
    assert set(result.dropped) == (set(dropped) if stage is Stage.MASK else set())


def test_mixed_stage_dropouts_are_recovered() -> None:
    cfg = make_config("run-b/2", ids(20), D, n_neighbours=8, max_dropouts=4)
    ups = updates_for(cfg, seed=3)
    drops = {
        "node-03": Stage.SHARE,
        "node-07": Stage.MASK,
        "node-11": Stage.MASK,
        "node-15": Stage.UNMASK,
    }
    result = simulate_round(cfg, ups, drop_before=drops)
    in_sum = [n for n in cfg.node_ids if n not in {"node-03", "node-07", "node-11"}]
    assert np.array_equal(result.integer_sum, expected_sum(cfg, ups, in_sum))


@pytest.mark.parametrize("stage", [Stage.ADVERTISE, Stage.MASK, Stage.UNMASK])
def test_t_plus_one_dropouts_are_refused(stage: Stage) -> None:
    cfg = make_config("run-c/1", ids(14), D, n_neighbours=6, max_dropouts=3)
    ups = updates_for(cfg, seed=4)
    dropped = cfg.node_ids[2:6]
    with pytest.raises(SecAggDropoutError, match=r"4 of 14 nodes dropped.*max_dropouts=3"):
        simulate_round(cfg, ups, drop_before=dict.fromkeys(dropped, stage))


def test_client_refuses_to_reveal_when_request_implies_too_many_dropouts() -> None:
    cfg = make_config("run-c/2", ids(8), 10, n_neighbours=4, max_dropouts=1)
    clients = {n: SecAggClient(cfg, n) for n in cfg.node_ids}
    server = SecAggServer(cfg)
    broadcasts = server.collect_keys([c.advertise_keys() for c in clients.values()])
    deliveries = server.collect_shares([clients[n].share_keys(b) for n, b in broadcasts.items()])
    client = clients["node-00"]
    client.mask_input(deliveries["node-00"], torch.zeros(10))
    nbrs = cfg.neighbours("node-00")
    with pytest.raises(SecAggError, match="both survivor and dropped"):
        client.unmask(UnmaskRequest(survivors=("node-00", nbrs[0]), dropped=(nbrs[0],)))
    survivors = tuple(n for n in cfg.node_ids if n not in nbrs[:2])
    with pytest.raises(SecAggDropoutError, match="refusing"):
        client.unmask(UnmaskRequest(survivors=survivors, dropped=nbrs[:2]))


def test_client_never_reveals_both_secrets_of_a_node() -> None:
    cfg = make_config("run-c/3", ids(10), 10, n_neighbours=4, max_dropouts=1)
    ups = {n: torch.zeros(10) for n in cfg.node_ids}
    server = SecAggServer(cfg)
    clients = {n: SecAggClient(cfg, n) for n in cfg.node_ids}
    broadcasts = server.collect_keys([c.advertise_keys() for c in clients.values()])
    deliveries = server.collect_shares([clients[n].share_keys(b) for n, b in broadcasts.items()])
    masked = [clients[n].mask_input(d, ups[n]) for n, d in deliveries.items() if n != "node-04"]
    requests = server.collect_masked(masked)
    answers = [clients[n].unmask(r) for n, r in requests.items()]
    for a in answers:
        assert not set(a.seed_shares) & set(a.key_shares)
        assert "node-04" not in a.seed_shares
    result = server.collect_unmask(answers)
    assert result.dropped == ("node-04",)
    assert torch.equal(result.total, torch.zeros(10))


def test_every_message_survives_json_encoding() -> None:
    cfg = make_config("run-d/1", ids(7), 300, n_neighbours=4, max_dropouts=1)
    cfg_wire = decode_message(encode_message(cfg))
    assert cfg_wire == cfg and cfg_wire.session_id == cfg.session_id
    ups = updates_for(cfg, seed=5)

    def wire(msgs):
        return [decode_message(encode_message(m)) for m in msgs]

    def wire_map(msgs):
        return {k: decode_message(encode_message(v)) for k, v in msgs.items()}

    server = SecAggServer(cfg)
    clients = {n: SecAggClient(cfg_wire, n) for n in cfg.node_ids}
    b = wire_map(server.collect_keys(wire([c.advertise_keys() for c in clients.values()])))
    d = wire_map(server.collect_shares(wire([clients[n].share_keys(x) for n, x in b.items()])))
    live = [n for n in d if n != "node-02"]
    r = wire_map(server.collect_masked(wire([clients[n].mask_input(d[n], ups[n]) for n in live])))
    result = server.collect_unmask(wire([clients[n].unmask(x) for n, x in r.items()]))
    assert np.array_equal(result.integer_sum, expected_sum(cfg, ups, live))
    with pytest.raises(SecAggError, match="malformed"):
        decode_message(b'{"type": "MaskedInput", "body": {"node_id": "x"}}')
    with pytest.raises(SecAggError, match="not a SecAgg message"):
        encode_message(object())


def test_protocol_violations_raise() -> None:
    cfg = make_config("run-e/1", ids(6), 10, n_neighbours=2, max_dropouts=1)
    server = SecAggServer(cfg)
    clients = {n: SecAggClient(cfg, n) for n in cfg.node_ids}
    adv = [c.advertise_keys() for c in clients.values()]
    with pytest.raises(SecAggError, match="stage ADVERTISE"):
        server.collect_shares([])
    with pytest.raises(SecAggError, match="called at stage SHARE"):
        clients["node-00"].advertise_keys()
    with pytest.raises(SecAggError, match="two AdvertiseKeys"):
        SecAggServer(cfg).collect_keys([*adv, adv[0]])
    with pytest.raises(SecAggError, match="not part of session"):
        SecAggClient(cfg, "intruder")
    broadcasts = server.collect_keys(adv)
    shares = {n: clients[n].share_keys(b) for n, b in broadcasts.items()}
    deliveries = server.collect_shares(shares.values())
    # A flipped bit in a forwarded share is caught by the AEAD.
    sender, ct = next(iter(deliveries["node-00"].encrypted_shares.items()))
    bad = ShareDelivery({**deliveries["node-00"].encrypted_shares, sender: ct[:-1] + b"\x00"})
    with pytest.raises(SecAggError, match="fails authentication"):
        clients["node-00"].mask_input(bad, torch.zeros(10))
    with pytest.raises(SecAggError, match="expects 10"):
        clients["node-01"].mask_input(deliveries["node-01"], torch.zeros(11))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_neighbours": 3}, "even"),
        ({"max_dropouts": 3}, "strict majority"),
        ({"clip_range": 1e9}, "32-bit sum"),
        ({"vector_length": 0}, "vector_length"),
    ],
)
def test_bad_config(kwargs: dict, match: str) -> None:
    base = {"session": "s", "node_ids": ids(20), "vector_length": 10, "n_neighbours": 4}
    with pytest.raises(ValueError, match=match):
        make_config(**{**base, **kwargs})
    with pytest.raises(ValueError, match="distinct"):
        make_config("s", ["a", "a", "b"], 10)
