"""The sponsor's side of pushing a prepared dataset to a hub (`gridswarm data push DIR --hub URL`;
the hub's side and the checks: hub/datasets.py).

The folder is verified against its manifest first (every file hashed), then offered; only the
blobs the hub says it lacks are uploaded, one request each, so a push that was cut off and run
again moves only what is still missing. The last offer answers `manifest:<sha256>`, the name a
run's `data.dataset` uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gridswarm.node.client import HubClient
from gridswarm.train.dataset import (
    TOKENIZER_FILE,
    DatasetError,
    DatasetOffer,
    DirSource,
    verify_folder,
)


@dataclass(frozen=True)
class Pushed:
    """What a push did: the dataset's name on the hub, and what moved."""

    dataset: str  # manifest:<sha256>
    blobs_sent: int
    bytes_sent: int
    blobs_total: int


def push_dataset(
    client: HubClient,
    folder: Path | DirSource,
    on_start: Callable[[int, int], None] = lambda blobs, size: None,
    on_blob: Callable[[int], None] = lambda size: None,
) -> Pushed:
    """Push the prepared dataset in `folder` (a path, verified here, or a `verify_folder`
    result) through `client` (signed by its identity). `on_start(blobs, bytes)` is told what
    will move, `on_blob(bytes)` after each upload. DatasetError if the folder does not match
    its manifest or the hub does not end complete; the hub's refusals raise `HubRequestError`."""
    source = folder if isinstance(folder, DirSource) else verify_folder(folder)
    manifest = source.manifest
    tokenizer_bytes = (source.folder / TOKENIZER_FILE).stat().st_size
    offer = DatasetOffer(manifest=manifest, tokenizer_bytes=tokenizer_bytes)
    body = offer.model_dump_json().encode()
    answer = client.offer_dataset(body)
    on_start(len(answer.missing), answer.missing_bytes)
    sent = 0
    for digest in answer.missing:
        data = source.path(digest).read_bytes()
        client.upload_dataset_blob(answer.manifest, digest, data)
        sent += len(data)
        on_blob(len(data))
    final = client.offer_dataset(body)
    if final.dataset is None:
        raise DatasetError(
            f"the hub still lacks {len(final.missing)} blobs of the dataset after the upload"
        )
    return Pushed(final.dataset, len(answer.missing), sent, len(manifest.digests()))
