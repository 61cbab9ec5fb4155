"""Blobs in S3-compatible object storage (AWS S3, MinIO, Ceph, moto's server...).

The same content-addressed contract as `LocalBlobStore`: a blob is named by its sha256, `put`
returns only once the object store has acknowledged the write (S3 writes are atomic and durable
when the PUT returns), and every read is verified against the name. Objects live under
`s3://bucket/prefix/ab/cd/<sha256>`.

Endpoint, region and credentials come from the standard AWS environment variables and files
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, ...),
so the hub needs no S3 settings of its own beyond `--blobs s3://bucket/prefix`.

`presigned_get_url` lets a node download a published version, delta or dataset shard straight
from the object store (the hub answers its blob route with a 307 redirect to such a URL), so the
hub's own link stops being the bottleneck; the node still checks the bytes' sha256. Where nodes
reach the store by another address than the hub does (the hub on a private endpoint, nodes over
the internet), `GRIDSWARM_S3_PUBLIC_ENDPOINT` names the endpoint presigned URLs are made for
(a presigned URL's signature covers its host, so it is signed for that endpoint, not rewritten).
"""

from __future__ import annotations

import os
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from gridswarm.blobs import BlobError, check_digest, sha256_hex

PRESIGN_EXPIRY_S = 3600
PUBLIC_ENDPOINT_ENV = "GRIDSWARM_S3_PUBLIC_ENDPOINT"


def parse_s3_url(url: str) -> tuple[str, str]:
    """('bucket', 'prefix') from 's3://bucket/prefix' (the prefix may be empty)."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not bucket:
        raise ValueError(f"s3 URL without a bucket: {url!r}")
    return bucket, prefix.strip("/")


class S3BlobStore:
    """Blobs as objects `prefix/ab/cd/<sha256>` in one bucket."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        client: Any | None = None,
        public_endpoint: str | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        config = Config(retries={"max_attempts": 5, "mode": "standard"})
        self.client = client or boto3.client("s3", config=config)
        public_endpoint = public_endpoint or os.environ.get(PUBLIC_ENDPOINT_ENV) or None
        # presigning is local (no request): a client for the nodes' endpoint signs their URLs
        self.presign_client = (
            boto3.client("s3", endpoint_url=public_endpoint, config=config)
            if public_endpoint
            else self.client
        )

    @classmethod
    def from_url(cls, url: str, client: Any | None = None) -> S3BlobStore:
        bucket, prefix = parse_s3_url(url)
        return cls(bucket, prefix, client)

    def __repr__(self) -> str:
        return f"S3BlobStore(s3://{self.bucket}/{self.prefix})"

    def _key(self, digest: str) -> str:
        check_digest(digest)
        name = f"{digest[:2]}/{digest[2:4]}/{digest}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (convenient for tests and first starts)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    def size(self, digest: str) -> int:
        """The object's length in bytes (a HEAD request); BlobError if it is missing."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(digest))
        except ClientError as exc:
            raise BlobError(f"s3 HEAD {digest}: {exc}") from exc
        except BotoCoreError as exc:
            raise BlobError(f"s3 HEAD {digest}: {exc}") from exc
        return int(head["ContentLength"])

    def has(self, digest: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(digest))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise BlobError(f"s3 HEAD {digest}: {exc}") from exc

    def put(
        self, data: bytes, expected_digest: str | None = None, known_sha256: str | None = None
    ) -> str:
        """As `LocalBlobStore.put` (`known_sha256`: computed by the caller over these bytes)."""
        digest = known_sha256 if known_sha256 is not None else sha256_hex(data)
        if expected_digest is not None and expected_digest != digest:
            raise BlobError(f"content hash {digest} does not match the declared {expected_digest}")
        if self.has(digest):
            return digest
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(digest), Body=data)
        except (ClientError, BotoCoreError) as exc:
            raise BlobError(f"s3 PUT {digest}: {exc}") from exc
        return digest

    def get(self, digest: str) -> bytes:
        try:
            data = self.client.get_object(Bucket=self.bucket, Key=self._key(digest))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise BlobError(f"blob {digest} not found") from exc
            raise BlobError(f"s3 GET {digest}: {exc}") from exc
        except BotoCoreError as exc:
            raise BlobError(f"s3 GET {digest}: {exc}") from exc
        if sha256_hex(data) != digest:
            raise BlobError(f"blob {digest} is corrupt in the object store (hash mismatch)")
        return data

    def delete(self, digest: str) -> None:
        """Remove a blob (a refused upload's bytes); missing blobs are fine."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(digest))
        except (ClientError, BotoCoreError) as exc:
            raise BlobError(f"s3 DELETE {digest}: {exc}") from exc

    def presigned_get_url(self, digest: str, expires_s: int = PRESIGN_EXPIRY_S) -> str:
        """A URL anyone holding it may GET the blob from for `expires_s` seconds."""
        try:
            return self.presign_client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self._key(digest)},
                ExpiresIn=int(expires_s),
            )
        except (ClientError, BotoCoreError) as exc:  # e.g. no credentials to sign with
            raise BlobError(f"s3 presign {digest}: {exc}") from exc
