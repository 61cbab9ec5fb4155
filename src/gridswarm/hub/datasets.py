"""Prepared datasets pushed by their sponsors (`gridswarm data push DIR --hub URL`).

A hub otherwise takes a prepared dataset only from a folder its operator opened (`--data-root`);
here a sponsor sends one over signed HTTP:

1. `POST /v1/datasets` (a `DatasetOffer`: the manifest, checked like a manifest read from disk,
   and the tokenizer's size). The hub answers the digests of the blobs it lacks. The first
   offer of a manifest by an identity is charged the bytes of those blobs against the
   identity's quota (429 `quota`) and the hub's cap on pushed datasets (413 `storage_full`),
   before anything is stored; offering again is free, and answers only what is still missing,
   so a push that was cut off resumes where it stopped.
2. `POST /v1/datasets/{manifest}/blobs/{digest}` per missing blob, body = its bytes. Before the
   body is read the hub knows from the offered manifest how large it must be (413 above that,
   404 for a blob of no offered manifest); then it checks the signature, that this identity
   offered the manifest (403), the sha256, the size, and the content (a shard: token ids below
   the vocabulary size at the manifest's dtype; the tokenizer: loads, with the manifest's
   vocabulary size and end-of-text id). Only then is the blob stored, with no lock held, and
   what it was found to be noted (`models.PushedBlob`), so another manifest naming the same
   bytes counts them as present only when it agrees with them.
3. The offer again: with nothing missing, the hub stores the manifest blob and answers
   `manifest:<sha256>`, which a run's `data.dataset` names (`POST /v1/runs`). Nodes then fetch
   manifest, tokenizer and only the shards they draw from `GET /v1/blobs/{digest}`.

Who may push is who may create runs: the `--sponsors` allow-list (403 `not_sponsor`) and the
per-key request rate limit (hub/limits.py). A refusal stores neither a blob nor a row.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated

from fastapi import FastAPI, Path, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gridswarm.blobs import BlobError, sha256_hex
from gridswarm.hub import models as m
from gridswarm.hub.errors import HubError
from gridswarm.hub.limits import check_dataset_quota, check_sponsor
from gridswarm.hub.openapi import openapi_body
from gridswarm.hub.store import datasets as store
from gridswarm.identity import VerifiedRequest
from gridswarm.protocol import (
    API,
    DIGEST_PATTERN,
    DatasetBlobAck,
    DatasetOfferResponse,
    Refusal,
    describe_errors,
)
from gridswarm.train.dataset import (
    MANIFEST_PREFIX,
    MAX_MANIFEST_BYTES,
    DatasetError,
    DatasetOffer,
    Manifest,
    check_manifest,
    check_shard,
    check_tokenizer,
    parse_manifest,
)

if TYPE_CHECKING:
    from gridswarm.hub.service import HubService

MAX_OFFER_BYTES = MAX_MANIFEST_BYTES + 4096  # the manifest (compact JSON) and one number
MAX_CACHED_MANIFESTS = 64  # parsed offered manifests kept in memory (uploads look them up)
DigestParam = Annotated[str, Path(pattern=DIGEST_PATTERN, description="a sha256 (hex)")]


def blob_sizes(manifest: Manifest, tokenizer_bytes: int) -> dict[str, int]:
    """Bytes of every blob a dataset needs, by sha256: its shards and its tokenizer."""
    sizes = {s.sha256: s.tokens * manifest.itemsize for s in manifest.shards()}
    sizes[manifest.tokenizer.sha256] = tokenizer_bytes
    return sizes


class HubDatasets:
    """Offers, checked uploads and quotas of pushed datasets (see the module docstring)."""

    def __init__(self, service: HubService) -> None:
        self.service = service
        # the quota check and the row it admits are one step in this process (replicas sharing
        # a database may each admit one offer at the same time: the quota is then exceeded by
        # at most one dataset per replica)
        self._admit = threading.Lock()
        self._manifests: dict[str, Manifest] = {}

    # ---------------------------------------------------------------- offers

    def offer(self, sponsor_key: bytes, body: bytes, max_blob_bytes: int) -> DatasetOfferResponse:
        """What the hub lacks of the offered dataset; `manifest:<sha256>` once it lacks nothing
        (its manifest blob then stored). The first offer by an identity is charged the missing
        bytes (quota, hub cap) and noted; nothing is stored when it is refused."""
        try:
            offer = DatasetOffer.model_validate_json(body)
            manifest = check_manifest(offer.manifest)
        except ValidationError as exc:
            raise HubError(422, f"malformed offer: {describe_errors(exc.errors())}") from exc
        except DatasetError as exc:
            raise HubError(422, str(exc)) from exc
        data = manifest.to_bytes()
        if len(data) > MAX_MANIFEST_BYTES:
            raise HubError(413, f"manifest of {len(data)} bytes exceeds {MAX_MANIFEST_BYTES}")
        if manifest.tokenizer.sha256 in {s.sha256 for s in manifest.shards()}:
            raise HubError(422, "invalid manifest: the tokenizer's sha256 is also a shard's")
        sizes = blob_sizes(manifest, offer.tokenizer_bytes)
        biggest = max(sizes.values())
        if biggest > max_blob_bytes:
            raise HubError(413, f"a blob of {biggest} bytes exceeds the hub's {max_blob_bytes}")
        digest, key, now = sha256_hex(data), sponsor_key.hex(), self.service.clock()
        with self._admit, self.service.sessions() as s:
            row = store.pushed_dataset(s, digest, key)
            missing = sorted(set(sizes) - self._present(s, manifest))
            missing_bytes = sum(sizes[d] for d in missing)
            if row is None:
                if missing_bytes:
                    identity_bytes, hub_bytes = store.offered_bytes(s, key)
                    check_dataset_quota(
                        identity_bytes,
                        hub_bytes,
                        missing_bytes,
                        self.service.settings.max_dataset_bytes_per_identity,
                        self.service.settings.max_dataset_bytes,
                    )
                row = m.PushedDataset(
                    manifest_sha256=digest,
                    sponsor_key=key,
                    manifest_json=data.decode(),
                    tokenizer_bytes=offer.tokenizer_bytes,
                    bytes=missing_bytes,
                    created_at=now,
                )
                store.add_pushed_dataset(s, row)
                s.commit()
            elif row.tokenizer_bytes != offer.tokenizer_bytes:
                raise HubError(
                    409,
                    f"this dataset was offered with a tokenizer of {row.tokenizer_bytes} bytes, "
                    f"not {offer.tokenizer_bytes}",
                    Refusal.CONFLICT,
                )
        self._remember(digest, manifest)
        if missing:
            return DatasetOfferResponse(
                manifest=digest, missing=missing, missing_bytes=missing_bytes
            )
        self._put(data, digest, None)  # no lock held: the store may be S3
        if row.completed_at is None:
            with self.service.sessions() as s:
                done = store.pushed_dataset(s, digest, key)
                if done is not None and done.completed_at is None:
                    done.completed_at = now
                    s.commit()
        return DatasetOfferResponse(
            manifest=digest, missing=[], missing_bytes=0, dataset=f"{MANIFEST_PREFIX}{digest}"
        )

    def _put(self, data: bytes, digest: str, known_sha256: str | None) -> None:
        """Store a checked blob; a store that fails (S3 down) is 503 `unavailable`."""
        try:
            self.service.blobs.put(data, expected_digest=digest, known_sha256=known_sha256)
        except (BlobError, OSError) as exc:
            raise HubError(503, f"cannot store blob {digest}: {exc}", Refusal.UNAVAILABLE) from exc

    @staticmethod
    def _present(s: Session, manifest: Manifest) -> set[str]:
        """The blobs of `manifest` the hub has checked on upload and that agree with it: shards
        of its dtype whose ids lie within its vocabulary, a tokenizer of its vocabulary."""
        wanted = sorted(blob_sizes(manifest, 1))
        present: set[str] = set()
        for row in store.pushed_blobs(s, wanted):
            if row.sha256 == manifest.tokenizer.sha256:
                eos = manifest.tokenizer.eos_id
                fits = row.kind == "tokenizer" and row.vocab_size == manifest.vocab_size
                fits = fits and (eos is None or row.eos_id == eos)
            else:
                fits = (
                    row.kind == "shard"
                    and row.dtype == manifest.dtype
                    and row.max_id is not None
                    and row.max_id < manifest.vocab_size
                )
            if fits:
                present.add(row.sha256)
        return present

    def _remember(self, digest: str, manifest: Manifest) -> None:
        if digest not in self._manifests and len(self._manifests) >= MAX_CACHED_MANIFESTS:
            self._manifests.pop(next(iter(self._manifests)))
        self._manifests[digest] = manifest

    def _manifest(self, s: Session, digest: str) -> Manifest | None:
        """An offered manifest (any identity's offer), parsed once and cached."""
        if digest in self._manifests:
            return self._manifests[digest]
        text = store.offered_manifest_json(s, digest)
        if text is None:
            return None
        manifest = parse_manifest(text.encode())
        self._remember(digest, manifest)
        return manifest

    # ---------------------------------------------------------------- uploads

    def expected_bytes(self, manifest_digest: str, digest: str) -> int:
        """The size blob `digest` of offered dataset `manifest_digest` must have, known before
        its body is read (404 if no offer names it)."""
        with self.service.sessions() as s:
            manifest = self._manifest(s, manifest_digest)
            if manifest is None:
                raise HubError(404, f"no dataset with manifest {manifest_digest} was offered")
            if digest == manifest.tokenizer.sha256:
                return int(store.offered_tokenizer_bytes(s, manifest_digest))
        sizes = {sh.sha256: sh.tokens * manifest.itemsize for sh in manifest.shards()}
        if digest not in sizes:
            raise HubError(404, f"blob {digest} is not part of dataset {manifest_digest}")
        return sizes[digest]

    def store_blob(
        self, sponsor_key: bytes, manifest_digest: str, digest: str, body: bytes, body_sha256: str
    ) -> DatasetBlobAck:
        """Check one uploaded tokenizer or shard against the manifest its sponsor offered, then
        store it (no lock held) and note what it is. A refusal stores nothing."""
        if body_sha256 != digest:
            raise HubError(422, f"the body's sha256 is {body_sha256}, not {digest}")
        with self.service.sessions() as s:
            row = store.pushed_dataset(s, manifest_digest, sponsor_key.hex())
            if row is None:
                raise HubError(
                    403,
                    f"this identity has not offered dataset {manifest_digest} "
                    f"(POST {API}/datasets first)",
                    Refusal.FORBIDDEN,
                )
            tokenizer_bytes = row.tokenizer_bytes
            manifest = self._manifest(s, manifest_digest)
        assert manifest is not None  # the row holds it
        facts: dict[str, object]
        try:
            if digest == manifest.tokenizer.sha256:
                if len(body) != tokenizer_bytes:
                    raise DatasetError(
                        f"tokenizer: {len(body)} bytes, the offer said {tokenizer_bytes}"
                    )
                check_tokenizer(body, manifest)
                facts = {
                    "kind": "tokenizer",
                    "vocab_size": manifest.vocab_size,
                    "eos_id": manifest.tokenizer.eos_id,
                }
            else:
                info = next(sh for sh in manifest.shards() if sh.sha256 == digest)
                largest = check_shard(body, manifest, info)
                facts = {"kind": "shard", "dtype": manifest.dtype, "max_id": largest}
        except StopIteration as exc:
            raise HubError(404, f"blob {digest} is not part of dataset {manifest_digest}") from exc
        except DatasetError as exc:
            raise HubError(422, str(exc)) from exc
        self._put(body, digest, body_sha256)  # no lock held: the store may be S3
        with self.service.sessions() as s:
            if store.pushed_blob(s, digest) is None:
                store.add_pushed_blob(
                    s,
                    m.PushedBlob(
                        sha256=digest, bytes=len(body), created_at=self.service.clock(), **facts
                    ),
                )
                try:
                    s.commit()
                except IntegrityError:  # the same bytes, noted by a concurrent upload
                    s.rollback()
        return DatasetBlobAck(digest=digest, bytes=len(body))


def add_dataset_routes(
    app: FastAPI,
    service: HubService,
    signed: Callable[..., Awaitable[tuple[VerifiedRequest, bytes]]],
    max_upload_bytes: int,
) -> None:
    """The signed dataset push endpoints under /v1/datasets (see the module docstring)."""
    datasets = service.datasets

    def sponsor(verified: VerifiedRequest) -> None:
        """Who may push: who may create runs (before the request's nonce is stored)."""
        check_sponsor(service.settings.sponsors, verified.public_key)

    @app.post(f"{API}/datasets", openapi_extra=openapi_body(DatasetOffer))
    async def offer_dataset(request: Request) -> DatasetOfferResponse:
        """Offer a prepared dataset: the answer lists the blobs the hub lacks, or names it
        `manifest:<sha256>` once it has them all. The first offer is charged the missing bytes
        (429 `quota` per identity, 413 `storage_full` for the hub)."""
        verified, body = await signed(request, MAX_OFFER_BYTES, admit=sponsor)
        return await run_in_threadpool(datasets.offer, verified.public_key, body, max_upload_bytes)

    @app.post(
        f"{API}/datasets/{{manifest}}/blobs/{{digest}}", openapi_extra=openapi_body(binary=True)
    )
    async def upload_dataset_blob(
        manifest: DigestParam, digest: DigestParam, request: Request
    ) -> DatasetBlobAck:
        """Body: the bytes of one tokenizer or shard of an offered dataset. Its size is known
        from the manifest before the body is read (413 above it); sha256, size and content are
        checked (422) before it is stored."""
        expected = await run_in_threadpool(datasets.expected_bytes, manifest, digest)
        verified, body = await signed(request, expected, admit=sponsor)
        return await run_in_threadpool(
            datasets.store_blob, verified.public_key, manifest, digest, body, verified.body_sha256
        )
