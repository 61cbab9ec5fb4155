"""Chunked, resumable, hash-checked model downloads over HTTP Range, against an in-process hub."""

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gridswarm.blobs import BlobError, RangeError, byte_range
from gridswarm.hub import models as m
from gridswarm.identity import Identity
from gridswarm.node.client import HubRequestError
from gridswarm.protocol import API, RegisterRequest
from tests.conftest import tiny_run


def test_byte_range_parsing_is_bounded():
    assert byte_range("bytes=0-9", 100, 64) == (0, 10)
    assert byte_range("bytes=90-", 100, 64) == (90, 10)
    assert byte_range("bytes=0-999", 100, 64) == (0, 64)  # capped: Content-Range says so
    for bad in ("bytes=100-", "bytes=5-4", "bytes=0-1,4-5", "items=0-1", "bytes=-5", "x" * 500):
        with pytest.raises(RangeError):
            byte_range(bad, 100, 64)


@pytest.fixture
def hub(in_process_hub):
    service, connect = in_process_hub()
    created = connect(Identity.generate()).create_run(tiny_run())
    node = connect(Identity.generate())
    node.register(RegisterRequest(probe_tokens_per_s=1e4, probe_numel=1000))
    return service, node, created.version_blob


def _bytes_counted(service, digest: str) -> int:
    with Session(service.sessions.kw["bind"]) as s:
        service.downloads.flush(s)  # counted in memory, written by the ticker
        s.commit()
        total = s.scalar(select(func.sum(m.Download.bytes_down)).where(m.Download.blob == digest))
    return int(total or 0)


def test_download_in_chunks_resumes_and_counts_each_byte_once(hub, tmp_path):
    service, node, digest = hub
    size = service.blobs.path(digest).stat().st_size
    part = tmp_path / "dl" / f"{digest}.part"
    part.parent.mkdir()
    part.write_bytes(service.blobs.get(digest)[:1000])  # a download cut off after 1000 bytes
    got = node.fetch_blob(digest, part, chunk_bytes=4096)
    assert got == size - 1000
    assert part.read_bytes() == service.blobs.get(digest)
    assert _bytes_counted(service, digest) == size - 1000
    assert node.fetch_blob(digest, part, chunk_bytes=4096) == 0  # complete: nothing more to get


def test_a_corrupt_partial_download_is_discarded_then_redone(hub, tmp_path):
    service, node, digest = hub
    part = tmp_path / f"{digest}.part"
    part.write_bytes(b"\x00" * 1000)  # not the blob's first bytes
    with pytest.raises(BlobError, match="does not match its hash"):
        node.fetch_blob(digest, part, chunk_bytes=1 << 20)
    assert not part.exists()
    node.fetch_blob(digest, part, chunk_bytes=1 << 20)
    assert part.read_bytes() == service.blobs.get(digest)


def test_bad_ranges_and_unpublished_blobs_are_refused(hub):
    service, node, digest = hub
    size = service.blobs.path(digest).stat().st_size
    for header in (f"bytes={size}-", "bytes=7-3", "bytes=0-1,5-9"):
        with pytest.raises(HubRequestError) as err:
            node.request("GET", f"{API}/blobs/{digest}", extra_headers={"range": header})
        assert err.value.status == 416
    with pytest.raises(HubRequestError) as err:
        node.request("GET", f"{API}/blobs/{'0' * 64}")
    assert err.value.status == 404
    whole = node.request("GET", f"{API}/blobs/{digest}")
    assert whole.content == service.blobs.get(digest)
    assert whole.headers["accept-ranges"] == "bytes"
