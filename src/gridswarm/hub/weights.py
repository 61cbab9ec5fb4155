"""Model weights pushed by their sponsors, to start runs from (`gridswarm run create RUN.toml
--init-from DIR`; the sponsor's side: `gridswarm/initfrom.py`).

Every run used to start from the random init its config's seed gives. A sponsor who has a
model instead turns it, on its own machine, into the hub's flat fp32 vector (the layout of a
version blob, `train/params.py`) and pushes it:

1. `POST /v1/weights`, body = a safetensors file holding exactly one tensor, `theta`: 1-D
   float32, every value finite. Before the body is read the hub knows its size from
   Content-Length: 413 above the hub's upload limit, 413 `storage_full` when it would take the
   hub's pushes past `--max-dataset-mb`, 429 `quota` when it would take the key the request
   names past its quota. Then the signature and the sponsor rule (the `--sponsors` list, 403
   `not_sponsor`, as for datasets and runs), the content (422), and this identity's quota
   (429 `quota`; pushed weights and pushed datasets share the quota and the cap,
   `store/datasets.offered_bytes`). Only then is the blob stored, by its sha256, with a
   `models.PushedWeights` row naming it and who pushed it. Pushing the same bytes again is
   free.
   The answer names it: `sha256:<hex>`.
   Weights too large for one request are offered in parts instead (`POST /v1/weights/offer`,
   a `WeightsOffer`: charged the whole size on an identity's first offer; the answer lists the
   missing parts), each part uploaded to `POST /v1/weights/{sha256}/parts/{index}` (its size
   known from the offer before the body is read; its sha256 and size checked; stored and
   noted), and the offer made again once all are in: the hub reads the parts back, checks the
   whole as above and completes the row. A cut-off push resumes with the missing parts only.
2. The run's config names it: `model.init_weights = "sha256:<hex>"`. `create_run` refuses (422
   `invalid_config`) a name no complete row of this sponsor's names (so a crafted config can
   never make a contribution's or any other blob version 0), and a vector whose length is not
   the model's (counted on the meta device: before the dataset is imported or the vector
   read); then version 0 is that vector (re-packed with the run's metadata, as a version blob
   always is; joined from its parts, its sha256 checked again, when it was pushed in parts)
   and its held-out loss is computed as for a random start.

Nodes need nothing new: they download version 0 as always. The pushed blob and its parts are
never served (`GET /v1/blobs` serves published versions and datasets only).
A refusal stores neither a blob nor a row.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path as PathLib
from typing import TYPE_CHECKING, Annotated

import torch
from fastapi import FastAPI, Path, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError

from gridswarm.blobs import BlobError, BlobStore, sha256_hex
from gridswarm.config import INIT_WEIGHTS_PREFIX, RunConfig
from gridswarm.hub import models as m
from gridswarm.hub.errors import HubError
from gridswarm.hub.limits import check_dataset_quota, check_sponsor
from gridswarm.hub.openapi import openapi_body
from gridswarm.hub.store import datasets as dataset_store
from gridswarm.hub.store import weights as store
from gridswarm.identity import HEADER_KEY, VerifiedRequest
from gridswarm.protocol import (
    API,
    DIGEST_PATTERN,
    MAX_WEIGHT_PARTS,
    Refusal,
    WeightsAck,
    WeightsOffer,
    WeightsOfferResponse,
    WeightsPartAck,
    describe_errors,
)
from gridswarm.train.dataset import DirSource, is_prepared, manifest_ref, parse_manifest
from gridswarm.train.params import BlobFormatError, unpack
from gridswarm.train.tokenizer import VOCAB_SIZE

if TYPE_CHECKING:
    from gridswarm.hub.service import HubService

MAX_OFFER_BYTES = 80 * MAX_WEIGHT_PARTS + 4096  # an offer's JSON: its part digests and numbers
DigestParam = Annotated[str, Path(pattern=DIGEST_PATTERN, description="a sha256 (hex)")]
PartParam = Annotated[int, Path(ge=0, lt=MAX_WEIGHT_PARTS, description="a part's index")]
KEY_PATTERN = r"[0-9a-f]{64}"  # an Ed25519 public key, hex
WHAT = "these weights would"  # in quota messages
VECTOR = "theta"  # the one tensor of a pushed weights blob (as in a version blob)


def check_weights_blob(data: bytes) -> torch.Tensor:
    """The flat fp32 vector in `data`; ValueError unless it is a safetensors file (read by the
    safetensors library, which checks the header's bounds) of exactly one 1-D float32 tensor
    named `theta` with at least one value, every value finite."""
    try:
        tensors, _ = unpack(data)
    except BlobFormatError as exc:
        raise ValueError(str(exc)) from exc
    if list(tensors) != [VECTOR]:
        names = ", ".join(sorted(tensors)[:4]) or "none"
        raise ValueError(f"weights must hold exactly one tensor '{VECTOR}', not: {names}")
    theta = tensors[VECTOR]
    if theta.dtype != torch.float32 or theta.dim() != 1 or theta.numel() == 0:
        raise ValueError(
            f"'{VECTOR}' must be a non-empty 1-D float32 vector, not {theta.dtype} "
            f"of shape {tuple(theta.shape)}"
        )
    finite = torch.isfinite(theta)
    if not bool(finite.all()):
        first = int((~finite).nonzero()[0, 0])
        raise ValueError(f"'{VECTOR}' holds a value that is not finite (at index {first})")
    return theta


def weights_digest(cfg: RunConfig) -> str | None:
    """The sha256 `model.init_weights` names, or None for a random start."""
    name = cfg.model.init_weights
    return None if name is None else name.removeprefix(INIT_WEIGHTS_PREFIX)


def pushed_numel(service: HubService, sponsor_key: bytes, cfg: RunConfig) -> int | None:
    """The length of the vector `cfg.model.init_weights` names (None: no name): 422
    `invalid_config` unless this sponsor pushed it (never any other blob)."""
    digest = weights_digest(cfg)
    if digest is None:
        return None
    with service.sessions() as s:
        row = store.pushed_weights(s, digest, sponsor_key.hex())
        numel = None if row is None or row.numel is None else int(row.numel)
    if numel is None:
        raise HubError(
            422,
            f"model.init_weights: no weights sha256:{digest} were pushed by this identity, "
            f"or their parts are not all in (POST {API}/weights first: gridswarm run create "
            f"--init-from DIR)",
            Refusal.INVALID_CONFIG,
        )
    return numel


def model_numel(cfg: RunConfig, blobs: BlobStore) -> int:
    """Parameters of the run's model, counted on PyTorch's meta device (shapes only, nothing
    allocated), with its dataset's vocabulary read from the manifest without importing the
    dataset: so a pushed vector of another length is refused before anything is stored.
    ValueError / OSError when the dataset cannot be read."""
    from gridswarm.train.model import build_model, count_parameters

    dataset, vocab = cfg.data.dataset, VOCAB_SIZE
    if is_prepared(dataset):
        digest = manifest_ref(dataset)
        if digest is not None:
            try:
                vocab = parse_manifest(blobs.get(digest)).vocab_size
            except BlobError as exc:
                raise ValueError(f"{dataset}: {exc}") from exc
        else:  # a prepared folder under the hub's --data-root (checked before)
            vocab = DirSource(PathLib(dataset).expanduser()).manifest.vocab_size
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.train.seq_len, cfg.seed, vocab)
    return count_parameters(model)


def check_numel(cfg: RunConfig, pushed: int, model_numel: int) -> None:
    """422 `invalid_config` when the pushed vector is not as long as the run's model."""
    if pushed != model_numel:
        raise HubError(
            422,
            f"model.init_weights: the pushed vector has {pushed:,} values, the run's model "
            f"({cfg.model.kind} {cfg.model.architecture or ''}) has {model_numel:,} parameters",
            Refusal.INVALID_CONFIG,
        )


def load_pushed(service: HubService, cfg: RunConfig, numel: int) -> torch.Tensor:
    """The pushed vector `cfg.model.init_weights` names (its row checked by `pushed_numel`),
    checked again as on upload (the store may have lost or changed it: 422 / 503)."""
    digest = weights_digest(cfg)
    assert digest is not None
    try:
        if service.blobs.has(digest):  # pushed whole
            data = service.blobs.get(digest)
        else:  # pushed in parts: the whole is their concatenation, checked by its sha256
            with service.sessions() as s:
                offer_json = store.offered_weights_json(s, digest)
            if offer_json is None:
                raise BlobError("neither the blob nor its parts are in the store")
            data = assemble(service, WeightsOffer.model_validate_json(offer_json))
    except (BlobError, OSError) as exc:
        raise HubError(503, f"cannot read weights {digest}: {exc}", Refusal.UNAVAILABLE) from exc
    try:
        theta = check_weights_blob(data)
    except ValueError as exc:
        raise HubError(422, f"model.init_weights: {exc}", Refusal.INVALID_CONFIG) from exc
    check_numel(cfg, theta.numel(), numel)
    return theta


def assemble(service: HubService, offer: WeightsOffer) -> bytes:
    """The whole blob of weights offered in parts, from its stored parts; BlobError unless it
    has the offer's size and sha256."""
    data = b"".join(service.blobs.get(part) for part in offer.parts)
    if len(data) != offer.bytes or sha256_hex(data) != offer.sha256:
        raise BlobError(
            f"the parts make {len(data)} bytes with sha256 {sha256_hex(data)}, not the "
            f"offered {offer.bytes} bytes with sha256 {offer.sha256}"
        )
    return data


class HubWeights:
    """Checked, quota-bounded storage of pushed weights (see the module docstring)."""

    def __init__(self, service: HubService) -> None:
        self.service = service
        # the quota check, the blob write and the row it admits are one step in this process
        # (replicas sharing a database may each admit one push at the same time: the quota is
        # then exceeded by at most one push per replica)
        self._admit = threading.Lock()

    def check_room(self, declared_bytes: int, claimed_key: str | None) -> None:
        """Before the body is read: 429 `quota` when `declared_bytes` (Content-Length) would
        take the key the request claims to be signed by past its quota, 413 `storage_full`
        when they would take the hub's pushes past its cap. The claim is not verified yet: it
        can only get its own request refused early; the quota is checked again once the
        signature says whose the request is."""
        settings = self.service.settings
        key = claimed_key if claimed_key and re.fullmatch(KEY_PATTERN, claimed_key) else ""
        with self.service.sessions() as s:
            identity_bytes, hub_bytes = dataset_store.offered_bytes(s, key)
        check_dataset_quota(
            identity_bytes if key else 0,
            hub_bytes,
            declared_bytes,
            settings.max_dataset_bytes_per_identity,
            settings.max_dataset_bytes,
            WHAT,
        )

    def store(self, sponsor_key: bytes, body: bytes, body_sha256: str) -> WeightsAck:
        """Check pushed weights (422), charge them to the identity (429 / 413) and store them
        with their row; the same bytes pushed again by the same identity are free. A refusal
        stores nothing."""
        try:
            numel = check_weights_blob(body).numel()
        except ValueError as exc:
            raise HubError(422, f"malformed weights: {exc}") from exc
        key, digest = sponsor_key.hex(), body_sha256
        ack = WeightsAck(weights=f"{INIT_WEIGHTS_PREFIX}{digest}", numel=numel, bytes=len(body))
        settings = self.service.settings
        with self._admit:
            with self.service.sessions() as s:
                row = store.pushed_weights(s, digest, key)
                if row is not None and row.numel is not None and self.service.blobs.has(digest):
                    return ack
                identity_bytes, hub_bytes = dataset_store.offered_bytes(s, key)
            if row is None:  # a row (an offer in parts, say) was charged already
                check_dataset_quota(
                    identity_bytes,
                    hub_bytes,
                    len(body),
                    settings.max_dataset_bytes_per_identity,
                    settings.max_dataset_bytes,
                    WHAT,
                )
            existed = self.service.blobs.has(digest)
            try:
                self.service.blobs.put(body, expected_digest=digest, known_sha256=digest)
            except (BlobError, OSError) as exc:
                raise HubError(
                    503, f"cannot store weights {digest}: {exc}", Refusal.UNAVAILABLE
                ) from exc
            try:
                with self.service.sessions() as s:
                    row = store.pushed_weights(s, digest, key)
                    if row is None:
                        row = m.PushedWeights(
                            sha256=digest,
                            sponsor_key=key,
                            numel=numel,
                            bytes=len(body),
                            created_at=self.service.clock(),
                            completed_at=self.service.clock(),
                        )
                        store.add_pushed_weights(s, row)
                    elif row.numel is None:  # offered in parts, now pushed whole
                        row.numel, row.completed_at = numel, self.service.clock()
                    try:
                        s.commit()
                    except IntegrityError:  # the same push, by another replica
                        s.rollback()
            except Exception:
                if not existed:
                    self.service.blobs.delete(digest)
                raise
        return ack

    # ------------------------------------------------------------ in parts

    def offer(self, sponsor_key: bytes, body: bytes, max_part_bytes: int) -> WeightsOfferResponse:
        """What the hub lacks of weights offered in parts; once it lacks nothing, the whole
        checked as a single push is (422 if it is not one finite fp32 vector) and `ack` names
        it. The first offer by an identity is charged the whole size (429 / 413, nothing
        stored); offering again is free and answers what is still missing (a cut-off push
        resumes)."""
        try:
            offer = WeightsOffer.model_validate_json(body)
        except ValidationError as exc:
            raise HubError(422, f"malformed offer: {describe_errors(exc.errors())}") from exc
        if offer.part_bytes > max_part_bytes:
            raise HubError(
                413, f"parts of {offer.part_bytes} bytes exceed the hub's {max_part_bytes}"
            )
        key, text = sponsor_key.hex(), offer.model_dump_json()
        name = f"{INIT_WEIGHTS_PREFIX}{offer.sha256}"
        settings = self.service.settings
        with self._admit, self.service.sessions() as s:
            row = store.pushed_weights(s, offer.sha256, key)
            if row is None:
                identity_bytes, hub_bytes = dataset_store.offered_bytes(s, key)
                check_dataset_quota(
                    identity_bytes,
                    hub_bytes,
                    offer.bytes,
                    settings.max_dataset_bytes_per_identity,
                    settings.max_dataset_bytes,
                    WHAT,
                )
                row = m.PushedWeights(
                    sha256=offer.sha256,
                    sponsor_key=key,
                    numel=None,
                    bytes=offer.bytes,
                    parts_json=text,
                    created_at=self.service.clock(),
                )
                store.add_pushed_weights(s, row)
                s.commit()
            elif row.parts_json is not None and row.parts_json != text:
                raise HubError(
                    409,
                    "these weights were offered in other parts: offer them as the first time",
                    Refusal.CONFLICT,
                )
            if row.numel is not None:  # complete (in parts, or pushed whole before)
                return WeightsOfferResponse(
                    weights=name,
                    missing=[],
                    ack=WeightsAck(weights=name, numel=int(row.numel), bytes=int(row.bytes)),
                )
            received = store.received_parts(s, offer.sha256, key)
        missing = [i for i, part in enumerate(offer.parts) if received.get(i) != part]
        if missing:
            return WeightsOfferResponse(weights=name, missing=missing)
        try:
            numel = check_weights_blob(assemble(self.service, offer)).numel()
        except BlobError as exc:
            raise HubError(422, f"malformed weights: {exc}") from exc
        except ValueError as exc:
            raise HubError(422, f"malformed weights: {exc}") from exc
        with self.service.sessions() as s:
            done = store.pushed_weights(s, offer.sha256, key)
            if done is not None and done.numel is None:
                done.numel, done.completed_at = numel, self.service.clock()
                s.commit()
        ack = WeightsAck(weights=name, numel=numel, bytes=offer.bytes)
        return WeightsOfferResponse(weights=name, missing=[], ack=ack)

    def part_size(self, sha256: str, index: int) -> int:
        """The size part `index` of offered weights `sha256` must have, known before its body
        is read (404 if no offer names it)."""
        with self.service.sessions() as s:
            text = store.offered_weights_json(s, sha256)
        if text is None:
            raise HubError(404, f"no weights {sha256} were offered in parts")
        offer = WeightsOffer.model_validate_json(text)
        if index >= len(offer.parts):
            raise HubError(404, f"weights {sha256} have {len(offer.parts)} parts, not {index + 1}")
        return offer.part_size(index)

    def store_part(
        self, sponsor_key: bytes, sha256: str, index: int, body: bytes, body_sha256: str
    ) -> WeightsPartAck:
        """Check one uploaded part against this identity's offer (403 without one; 422 for
        another sha256 or size), then store it and note it. A refusal stores nothing."""
        key = sponsor_key.hex()
        with self.service.sessions() as s:
            row = store.pushed_weights(s, sha256, key)
            text = None if row is None else row.parts_json
        if text is None:
            raise HubError(
                403,
                f"this identity has not offered weights {sha256} in parts "
                f"(POST {API}/weights/offer first)",
                Refusal.FORBIDDEN,
            )
        offer = WeightsOffer.model_validate_json(text)
        if index >= len(offer.parts):
            raise HubError(404, f"weights {sha256} have {len(offer.parts)} parts, not {index + 1}")
        if body_sha256 != offer.parts[index] or len(body) != offer.part_size(index):
            raise HubError(
                422,
                f"part {index}: {len(body)} bytes with sha256 {body_sha256}, the offer says "
                f"{offer.part_size(index)} bytes with sha256 {offer.parts[index]}",
            )
        try:
            self.service.blobs.put(body, expected_digest=body_sha256, known_sha256=body_sha256)
        except (BlobError, OSError) as exc:
            raise HubError(503, f"cannot store part {index}: {exc}", Refusal.UNAVAILABLE) from exc
        with self.service.sessions() as s:
            if store.received_parts(s, sha256, key).get(index) is None:
                part = m.PushedWeightPart(
                    sha256=sha256, sponsor_key=key, idx=index, part_sha256=body_sha256
                )
                store.add_part(s, part)
                try:
                    s.commit()
                except IntegrityError:  # the same part, uploaded twice at once
                    s.rollback()
        return WeightsPartAck(index=index, bytes=len(body))


def add_weights_routes(
    app: FastAPI,
    service: HubService,
    signed: Callable[..., Awaitable[tuple[VerifiedRequest, bytes]]],
    max_upload_bytes: int,
) -> None:
    """The signed weights push endpoint, POST /v1/weights (see the module docstring)."""
    weights = HubWeights(service)

    def sponsor(verified: VerifiedRequest) -> None:
        """Who may push: who may create runs (before the request's nonce is stored)."""
        check_sponsor(service.settings.sponsors, verified.public_key)

    @app.post(f"{API}/weights", openapi_extra=openapi_body(binary=True))
    async def push_weights(request: Request) -> WeightsAck:
        """Body: a safetensors file of one 1-D float32 tensor `theta`, every value finite (a
        model as the hub's flat vector: `gridswarm run create --init-from DIR` makes it). Its
        size is checked from Content-Length before the body is read (413 over the upload
        limit, 413 `storage_full` over the hub's cap); then the sponsor rule (403), the
        content (422) and the identity's quota (429 `quota`). The answer's `weights` is the
        name a run's `model.init_weights` uses."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and len(declared) <= 20:
            if int(declared) > max_upload_bytes:
                raise HubError(
                    413, f"request body of {declared} bytes exceeds the {max_upload_bytes} limit"
                )
            claimed = request.headers.get(HEADER_KEY)
            await run_in_threadpool(weights.check_room, int(declared), claimed)
        verified, body = await signed(request, max_upload_bytes, admit=sponsor)
        return await run_in_threadpool(
            weights.store, verified.public_key, body, verified.body_sha256
        )

    @app.post(f"{API}/weights/offer", openapi_extra=openapi_body(WeightsOffer))
    async def offer_weights(request: Request) -> WeightsOfferResponse:
        """Offer weights too large for one request in parts: the answer lists the parts the
        hub lacks, or, once it has them all and checked the whole, `ack` names them. The first
        offer is charged the whole size (429 `quota`, 413 `storage_full`)."""
        verified, body = await signed(request, MAX_OFFER_BYTES, admit=sponsor)
        return await run_in_threadpool(weights.offer, verified.public_key, body, max_upload_bytes)

    @app.post(f"{API}/weights/{{sha256}}/parts/{{index}}", openapi_extra=openapi_body(binary=True))
    async def upload_weights_part(
        sha256: DigestParam, index: PartParam, request: Request
    ) -> WeightsPartAck:
        """Body: part `index` of offered weights. Its size is known from the offer before the
        body is read (413 above it); its sha256 and size are checked (422) before it is
        stored."""
        expected = await run_in_threadpool(weights.part_size, sha256, index)
        verified, body = await signed(request, expected, admit=sponsor)
        return await run_in_threadpool(
            weights.store_part, verified.public_key, sha256, index, body, verified.body_sha256
        )
