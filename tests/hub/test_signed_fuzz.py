"""Signed fuzzing: hypothesis mutates valid requests for every handler of the hub and signs them
with a real registered identity, so each reaches past authentication into the handler
(contribution blobs and SecAgg stages included). Whatever it sends: no 5xx, no hang, and a
refusal changes no row and stores no byte (refusals the hub records on its ledger on purpose,
such as a false work claim, are the documented exception)."""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gridswarm.blobs import sha256_hex
from gridswarm.hub.service import HubSettings
from gridswarm.identity import Identity
from gridswarm.ledger.ops import fund_claim, payout_address_claim
from gridswarm.privacy.live import SECAGG_CODEC
from gridswarm.protocol import API, Refusal
from gridswarm.train.codecs import make_codec
from gridswarm.train.params import pack, pack_vector, unpack_vector
from tests.conftest import tiny_run
from tests.examples import examples
from tests.hub.harness import Hub, meta_fields

EXAMPLES = int(os.environ.get("GRIDSWARM_FUZZ_EXAMPLES", examples(25)))  # per handler
MAX_REQUEST_S = 5.0
LEDGER_REFUSALS = {  # refusals the hub writes to its ledger (a strike) by design
    Refusal.FALSE_CLAIM,
    Refusal.BAD_CLAIM,
    Refusal.ENERGY_FLOOR,
    Refusal.REPLAYED_UPDATE,
    Refusal.STALE,  # the late assignment is marked late
}
HOSTILE_VALUES = [
    None,
    True,
    0,
    -1,
    2**31,
    2**63,
    2**64,
    10**30,
    10**400,
    -(10**400),
    0.5,
    -0.0,
    1e308,
    -1e308,
    float("inf"),
    float("-inf"),
    float("nan"),
    "",
    "\ud800",
    "a\x00b",
    "\u202e",
    "x" * 5000,
    "0" * 32,
    "../../etc/passwd",
    [],
    [1, 2],
    {},
    {"b64": "!!"},
    {"nested": {"deeper": [None]}},
]
WAIT_VALUES = ["0", "0.01", "nan", "inf", "-inf", "-1", "61", "1e999", "abc", ""]


class World:
    """A hub with one plain run and one SecAgg run waiting in its share stage, a sponsor, and
    nodes holding assignments: the valid requests the fuzzer mutates."""

    def __init__(self, root: Path) -> None:
        self.hub = Hub(
            root,
            HubSettings(
                requests_per_s=1e6,
                request_burst=1e6,
                max_active_runs_per_identity=10**6,
                max_runs_per_hour_per_identity=10**6,
            ),
        )
        self.sponsor = Identity.generate()
        self.node = Identity.generate()
        self.hub.register(self.node)
        no_audits = {"audit_max_rate": 0, "audit_min_rate": 0}
        self.config = tiny_run(trust=no_audits, round={"deadline_s": 600, "quorum": 1})
        self.run_id = self.hub.create_run(self.sponsor, self.config)
        self.assignment = self.hub.assignment(self.node, self.run_id)
        self.numel = self.hub.numel(self.run_id)
        self.secagg_nodes = [Identity.generate(), Identity.generate()]
        secagg = tiny_run(
            trust=no_audits,
            round={"deadline_s": 600, "quorum": 2, "min_nodes": 2},
            privacy={"secagg": {"neighbours": 2, "max_dropouts": 0}},
        )
        for who in self.secagg_nodes:
            self.hub.register(who)
        self.secagg_run = self.hub.create_run(self.sponsor, secagg)
        self.secagg_assignments = [
            self.hub.assignment(w, self.secagg_run) for w in self.secagg_nodes
        ]
        self.advertisements = [self.advertisement(a) for a in self.secagg_assignments]
        for who, body in zip(self.secagg_nodes, self.advertisements, strict=True):
            r = self.hub.post(who, f"{API}/runs/{self.secagg_run}/secagg/advertise", body)
            assert r.status_code == 200, r.text
        self.hub.service.ticker.tick()  # the round moves to its SecAgg share stage
        self.dataset_offer, self.shard = small_dataset_offer()
        r = self.hub.post(self.sponsor, f"{API}/datasets", self.dataset_offer)
        assert r.status_code == 200, r.text
        self.dataset_manifest = r.json()["manifest"]
        # pushed weights (hub/weights.py) that a run's model.init_weights may name
        start = torch.randn(self.numel, generator=torch.Generator().manual_seed(3)) * 0.02
        self.weights_blob = pack_vector(start)
        r = self.hub.post(self.sponsor, f"{API}/weights", self.weights_blob)
        assert r.status_code == 200, r.text
        self.weights = r.json()["weights"]
        # other weights offered in two parts, the first one uploaded
        from gridswarm.protocol import WeightsOffer

        other = pack_vector(start * 2)
        half = len(other) // 2 + 1
        self.weights_parts = [other[:half], other[half:]]
        self.weights_offer = WeightsOffer(
            sha256=sha256_hex(other),
            bytes=len(other),
            part_bytes=half,
            parts=[sha256_hex(p) for p in self.weights_parts],
        ).model_dump(mode="json")
        r = self.hub.post(self.sponsor, f"{API}/weights/offer", self.weights_offer)
        assert r.status_code == 200, r.text
        part0 = f"{API}/weights/{self.weights_offer['sha256']}/parts/0"
        r = self.hub.post(self.sponsor, part0, self.weights_parts[0])
        assert r.status_code == 200, r.text

    def advertisement(self, a) -> dict[str, Any]:
        keys = [base64.b64encode(os.urandom(32)).decode() for _ in range(2)]
        return {
            "meta": meta_fields(a, 32 * 8, SECAGG_CODEC),
            "cipher_key": keys[0],
            "mask_key": keys[1],
        }

    def share_keys(self) -> dict[str, Any]:
        me, other = (w.node_id for w in self.secagg_nodes)
        b64 = base64.b64encode
        return {
            "type": "ShareKeys",
            "body": {
                "node_id": me,
                "encrypted_shares": {other: {"b64": b64(os.urandom(2 * 66 + 16)).decode()}},
                "seed_commitment": {"b64": b64(os.urandom(32)).decode()},
            },
        }

    def contribution_tensors(self) -> dict[str, torch.Tensor]:
        return make_codec("int8").encode(torch.randn(self.numel) * 1e-3)


def small_dataset_offer() -> tuple[dict[str, Any], bytes]:
    """A valid offer of a two-shard bytes-tokenised dataset (hub/datasets.py), built by hand,
    and the bytes of its train shard."""
    from gridswarm.blobs import sha256_hex
    from gridswarm.train.dataset import DatasetOffer, Manifest, ShardInfo, TokenizerInfo

    train, val = bytes(range(64, 80)), bytes(range(80, 96))  # 8 uint16 tokens each
    tok = TokenizerInfo(kind="bytes", sha256="c" * 64, vocab_size=256, eos_id=None)
    manifest = Manifest(
        tokenizer=tok,
        dtype="uint16",
        shard_tokens=8,
        tokens_train=8,
        tokens_val=8,
        sources=["x.txt"],
        train=[ShardInfo(file="train-00000.bin", tokens=8, sha256=sha256_hex(train))],
        val=[ShardInfo(file="val-00000.bin", tokens=8, sha256=sha256_hex(val))],
    )
    offer = DatasetOffer(manifest=manifest, tokenizer_bytes=100)
    return offer.model_dump(mode="json"), train


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("fuzz"))


# ---------------------------------------------------------------- mutations


def paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside a JSON document (the root included)."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, (*prefix, i))
    return out


def replaced(doc: Any, path: tuple, value: Any, delete: bool) -> Any:
    if not path:
        return value
    doc = json.loads(json.dumps(doc))  # a copy
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


@st.composite
def mutated_doc(draw: st.DrawFn, doc: Any) -> Any:
    """`doc` with one value replaced or removed, or a key added."""
    if isinstance(doc, dict) and draw(st.integers(0, 3)) == 0:
        return {**doc, draw(st.text(max_size=8)): 1}
    path = draw(st.sampled_from(paths(doc)))
    value = draw(st.sampled_from(HOSTILE_VALUES) | st.text(max_size=20) | st.integers())
    return replaced(doc, path, value, draw(st.booleans()))


@st.composite
def mutated_json(draw: st.DrawFn, doc: Any) -> bytes:
    """`doc` mutated (`mutated_doc`), or its JSON bytes damaged."""
    if draw(st.integers(0, 3)) == 0:
        return draw(mutated_bytes(json.dumps(doc).encode()))
    return json.dumps(draw(mutated_doc(doc))).encode()


@st.composite
def mutated_bytes(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` truncated, with bytes flipped, or with junk inserted."""
    how = draw(st.sampled_from(["truncate", "flip", "insert"]))
    at = draw(st.integers(0, max(len(data) - 1, 0)))
    if how == "truncate":
        return data[:at]
    if how == "flip":
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    return data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]


# ---------------------------------------------------------------- the check


def check(world: World, who: Identity, path: str, body: bytes, params: dict | None = None):
    hub = world.hub
    before, blob_bytes = hub.snapshot(), hub.blob_bytes()
    started = time.monotonic()
    r = hub.post(who, path, body, params=params)
    assert time.monotonic() - started < MAX_REQUEST_S, f"POST {path} hung"
    assert r.status_code < 500, f"POST {path} -> {r.status_code}: {r.text[:500]}"
    if r.status_code >= 400:
        problem = r.json()
        assert set(problem) == {"detail", "reason"}, problem
        if Refusal(problem["reason"]) not in LEDGER_REFUSALS:
            assert hub.snapshot() == before, f"refused POST {path} changed rows: {problem}"
        assert hub.blob_bytes() == blob_bytes, f"refused POST {path} stored bytes: {problem}"
    return r


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(data=st.data())
def test_fuzz_json_handlers(world: World, data: st.DataObject) -> None:
    w = world
    a = w.assignment
    handlers = {
        f"{API}/nodes/register": (w.node, {"probe_tokens_per_s": 1e5, "probe_numel": 1000}),
        f"{API}/nodes/heartbeat": (w.node, {"status": "training", "run_id": w.run_id}),
        f"{API}/nodes/energy": (
            w.node,
            {
                "run_id": w.run_id,
                "region": "DE",
                "at_s": w.hub.clock(),
                "power_w": 50.0,
                "intensity_forecast": [[w.hub.clock(), 100.0]],
                "availability_forecast": [[w.hub.clock(), True]],
            },
        ),
        f"{API}/runs": (w.sponsor, {"config": w.config}),
        f"{API}/runs/{w.run_id}/fund": (
            w.sponsor,
            fund_claim(w.sponsor, 5, run_id=w.run_id).to_dict(),
        ),
        f"{API}/nodes/payout-address": (
            w.node,
            payout_address_claim(w.node, "0x" + "A" * 40).to_dict(),
        ),
        f"{API}/runs/{w.secagg_run}/secagg/advertise": (
            w.secagg_nodes[0],
            w.advertisement(w.secagg_assignments[0]),
        ),
        f"{API}/runs/{w.secagg_run}/secagg/task": (
            w.secagg_nodes[0],
            {"assignment_id": w.secagg_assignments[0].id},
        ),
        f"{API}/runs/{w.secagg_run}/secagg/0/0/share": (w.secagg_nodes[0], w.share_keys()),
        f"{API}/runs/{w.secagg_run}/secagg/0/0/unmask": (
            w.secagg_nodes[0],
            {"type": "UnmaskShares", "body": {"node_id": "x", "seed_shares": {}, "key_shares": {}}},
        ),
        f"{API}/runs/{w.run_id}/assignment": (w.node, {}),
        f"{API}/nodes/leave": (Identity.generate(), {}),
        f"{API}/datasets": (w.sponsor, w.dataset_offer),
    }
    path = data.draw(st.sampled_from(sorted(handlers)), label="handler")
    who, valid = handlers[path]
    body = data.draw(mutated_json(valid), label="body")
    params = None
    if path.endswith(("/assignment", "/task")):
        params = {"wait_s": data.draw(st.sampled_from(WAIT_VALUES), label="wait_s")}
    check(w, who, path, body, params)
    assert a.id  # the plain run's assignment stays usable for the blob handler


@FUZZ
@given(data=st.data())
def test_fuzz_contribution_blobs(world: World, data: st.DataObject) -> None:
    w = world
    tensors = w.contribution_tensors()
    meta = meta_fields(w.assignment, 32 * 8)
    how = data.draw(st.sampled_from(["meta", "meta", "bytes", "tensors"]), label="mutate")
    if how == "meta":
        mutated = data.draw(mutated_doc(meta), label="meta")
        body = pack(tensors, mutated if isinstance(mutated, dict) else {"meta": mutated})
    elif how == "tensors":
        name = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
        value = data.draw(st.sampled_from([float("nan"), float("inf"), 1e38, -1e38]))
        tensors[name] = tensors[name].float().fill_(value).to(tensors[name].dtype)
        body = pack(tensors, meta)
    else:
        body = data.draw(mutated_bytes(pack(tensors, meta)), label="blob")
    r = check(w, w.node, f"{API}/runs/{w.run_id}/contributions", body)
    if r.status_code == 200:  # a harmless mutation was accepted: give the node new work
        w.hub.service.ticker.tick()
        w.assignment = w.hub.assignment(w.node, w.run_id) or w.assignment


@FUZZ
@given(data=st.data())
def test_fuzz_dataset_blobs(world: World, data: st.DataObject) -> None:
    """A pushed shard, damaged (or whole), under its own or a mangled manifest and digest."""
    from gridswarm.blobs import sha256_hex

    w = world
    body = data.draw(mutated_bytes(w.shard) | st.just(w.shard), label="shard")
    manifest = data.draw(st.sampled_from([w.dataset_manifest, "0" * 64, "x"]), label="manifest")
    digest = data.draw(st.sampled_from([sha256_hex(w.shard), sha256_hex(body), "1" * 64, "..."]))
    check(w, w.sponsor, f"{API}/datasets/{manifest}/blobs/{digest}", body)


@FUZZ
@given(data=st.data())
def test_fuzz_weights(world: World, data: st.DataObject) -> None:
    """Pushed weights, damaged, with a hostile value, or whole; and runs whose
    `model.init_weights` names pushed weights, another blob, nothing, or junk."""
    from gridswarm.blobs import sha256_hex

    w = world
    how = data.draw(
        st.sampled_from(["bytes", "value", "whole", "config", "offer", "part"]), label="mutate"
    )
    if how == "offer":
        body = data.draw(mutated_json(w.weights_offer), label="offer")
        check(w, w.sponsor, f"{API}/weights/offer", body)
        return
    if how == "part":
        index = data.draw(st.sampled_from(["0", "1", "2", "-1", "65536", "x"]), label="index")
        digest = data.draw(st.sampled_from([w.weights_offer["sha256"], "2" * 64, "zz"]))
        part = w.weights_parts[1] if index == "1" else w.weights_parts[0]
        body = data.draw(mutated_bytes(part) | st.just(part), label="part")
        check(w, w.sponsor, f"{API}/weights/{digest}/parts/{index}", body)
        return
    if how == "config":
        name = data.draw(
            st.sampled_from(
                [
                    w.weights,
                    f"sha256:{w.dataset_manifest}",
                    f"sha256:{sha256_hex(w.weights_blob[:-1])}",
                    "sha256:" + "0" * 64,
                    "sha256:",
                    w.weights.upper(),
                ]
            ),
            label="init_weights",
        )
        config = {**w.config, "model": {**w.config["model"], "init_weights": name}}
        body = data.draw(mutated_json({"config": config}) | st.just(json.dumps({"config": config})))
        check(w, w.sponsor, f"{API}/runs", body.encode() if isinstance(body, str) else body)
        return
    if how == "bytes":
        body = data.draw(mutated_bytes(w.weights_blob), label="blob")
    elif how == "value":
        theta = unpack_vector(w.weights_blob).clone()
        at = data.draw(st.integers(0, theta.numel() - 1), label="at")
        theta[at] = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e38]))
        body = pack_vector(theta)
    else:
        body = w.weights_blob
    check(w, w.sponsor, f"{API}/weights", body)


@FUZZ
@given(data=st.data())
def test_fuzz_masked_inputs_and_paths(world: World, data: st.DataObject) -> None:
    w = world
    round_ = data.draw(st.sampled_from(["0", "1", "-1", "99999999999999999999", "x"]))
    attempt = data.draw(st.sampled_from(["0", "1", "-5", "1e3"]))
    stage = data.draw(st.sampled_from(["masked", "share", "unmask", "bogus", "m" * 40]))
    body = data.draw(st.binary(max_size=64) | st.just(b"\x00" * 4 * w.numel), label="body")
    path = f"{API}/runs/{w.secagg_run}/secagg/{round_}/{attempt}/{stage}"
    check(w, w.secagg_nodes[1], path, body)


@FUZZ
@given(
    run_id=st.sampled_from(["", "x" * 65, "%00", "a%2Fb", "..", "0" * 12]) | st.text(max_size=12),
    query=st.dictionaries(
        st.sampled_from(["limit", "start_seq", "kind"]),
        st.sampled_from(["-1", "1e999", "nan", "99999999999999999999", "x" * 100, "5"]),
    ),
)
def test_fuzz_reads(world: World, run_id: str, query: dict) -> None:
    hub = world.hub
    run_id = urllib.parse.quote(run_id, safe="%")
    for path in (
        f"{API}/runs/{run_id}",
        f"{API}/runs/{run_id}/report",
        f"{API}/runs/{run_id}/versions/latest",
        f"{API}/blobs/{run_id}",
        f"{API}/nodes/{run_id}/balance",
        f"{API}/ledger/reward-claims/{run_id}",
        f"{API}/ledger",
    ):
        r = hub.http.get(path, params=query)
        assert r.status_code < 500, f"GET {path} {query} -> {r.status_code}: {r.text[:300]}"
