"""A signed HTTP client of the hub, used by nodes and by the sponsor CLI.

Requests are retried with backoff while the hub is unreachable (it may be restarting), each retry
freshly signed, for `retry_for_s` (None: until stopped). Each wait is announced to `on_retry` (the
node prints a countdown) and cut short by `stop` (SIGINT/SIGTERM). A 4xx answer is final and raised
as `HubRequestError` with the hub's reason; a hub that stays unreachable as `HubUnreachable`.
Model blobs are downloaded in HTTP Range chunks into a `.part` file that a later call resumes
(after a lost connection or a restart), and checked against their sha256 at the end. A hub whose
blobs live in S3 answers each chunk with a 307 to a short-lived presigned URL: the client sends
the same Range there with a separate HTTP client (no signature headers leave for the object
store) and checks the bytes exactly as it checks the hub's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from pydantic import BaseModel

from gridswarm.blobs import BlobError, sha256_hex, sha256_of_file
from gridswarm.identity import Identity, sign_request
from gridswarm.protocol import (
    API,
    DEFAULT_HEARTBEAT_S,
    MAX_LONG_POLL_S,
    MAX_REASON_CHARS,
    AssignmentResponse,
    ContributionAck,
    DatasetBlobAck,
    DatasetOfferResponse,
    EnergyReport,
    FailureReport,
    HeartbeatRequest,
    HeartbeatResponse,
    NodeStatus,
    Refusal,
    RegisterRequest,
    RegisterResponse,
    RunCreateResponse,
    RunStateRequest,
    WeightsAck,
    WeightsOffer,
    WeightsOfferResponse,
    WeightsPartAck,
)

log = logging.getLogger("gridswarm.node")
# one ranged download request: a 10 M-parameter int8 update (11 MB) in one request, not two
# (each costs a signed request, a nonce and a download row on the hub); what a lost
# connection loses at most, and what one request holds in memory on each side
CHUNK_BYTES = 16 << 20
OBJECT_STORE_TRIES = 3  # a failing presigned GET is retried with a fresh URL from the hub
MAX_LOCATION_CHARS = 8192  # a presigned URL longer than this is refused
MAX_OBJECT_BYTES = 1 << 31  # the most one whole-blob download from the object store reads
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


class HubRequestError(Exception):
    """The hub refused a request: HTTP `status`, its `detail` and its typed `reason` (None when
    the answer carried none, e.g. a proxy's error page)."""

    def __init__(self, status: int, detail: str, reason: Refusal | None = None) -> None:
        super().__init__(f"hub answered {status}: {detail}")
        self.status = status
        self.detail = detail
        self.reason = reason


def _rate_limited(response: httpx.Response) -> bool:
    """A 429 for the request rate (not a quota: waiting seconds would not help that)."""
    if response.status_code != 429 or "retry-after" not in response.headers:
        return False
    try:
        return response.json().get("reason") == Refusal.RATE_LIMITED
    except ValueError:
        return False


class ObjectStoreError(BlobError):
    """The object store a hub redirected a download to did not answer as expected."""


class HubURLError(ValueError):
    """The hub URL cannot be used (no http:// or https:// scheme, no host)."""


class HubUnreachable(httpx.TransportError):
    """The hub did not answer for as long as the client was told to retry."""

    def __init__(self, url: str, cause: str, waited_s: float) -> None:
        super().__init__(f"cannot reach the hub at {url} ({cause}) after {waited_s:.0f} s")
        self.url = url
        self.cause = cause


class HubTLSError(ConnectionError):
    """The hub's TLS certificate is not trusted, or it speaks TLS to a plain http:// URL: retrying
    cannot help, so the client says so at once."""


def tls_verify(ca: str | Path | None = None) -> ssl.SSLContext:
    """Certificates a client trusts: the CA bundle `ca` (or the file named by $GRIDSWARM_CA), for a
    hub whose certificate a private CA signed; else the system's store."""
    ca = ca or os.environ.get(CA_ENV) or None
    if ca is not None and not Path(ca).is_file():
        raise HubTLSError(f"CA file {ca} not found (--ca / {CA_ENV})")
    return ssl.create_default_context(cafile=str(ca) if ca else None)


def tls_failure(url: str, exc: httpx.TransportError) -> HubTLSError | None:
    """The clear error for a TLS mismatch, or None for an ordinary (retryable) transport error.

    Only what retrying cannot mend is final: a certificate this machine does not trust, and plain
    HTTP sent to a hub that speaks TLS. A hub that dies mid-request also closes the connection
    without an answer, so that case is told apart by offering the hub a TLS handshake."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return HubTLSError(
                f"the hub at {url} has a TLS certificate this machine does not trust "
                f"({cause.verify_message}): give its CA with --ca or {CA_ENV}"
            )
        cause = cause.__cause__ or cause.__context__
    plain = url.startswith("http://") and isinstance(exc, httpx.RemoteProtocolError)
    if plain and speaks_tls(httpx.URL(url)):
        return HubTLSError(f"the hub at {url} serves TLS: use https:// instead of http://")
    return None


def speaks_tls(url: httpx.URL, timeout_s: float = 2.0) -> bool:
    """Whether the server at `url`'s host and port completes a TLS handshake (any certificate)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((url.host, url.port or 80), timeout=timeout_s) as sock,
            context.wrap_socket(sock, server_hostname=url.host),
        ):
            return True
    except OSError:  # refused, reset, timed out, or no TLS there (ssl.SSLError is an OSError)
        return False


class ClientStopped(Exception):
    """The client's `stop` event was set while it waited to retry."""


CA_ENV = "GRIDSWARM_CA"  # a CA bundle (PEM) to trust for the hub's TLS certificate
URL_PATTERN = re.compile(r"^https?://[^/\s:]+")
RetryCallback = Callable[[str, float, float | None], None]  # (cause, retry in s, give up in s)


MAX_HUB_URLS = 16  # replicas one client fails over between


def check_hub_url(url: str) -> str:
    """`url` without a trailing slash, or HubURLError saying how to write it."""
    if not URL_PATTERN.match(url):
        hint = f" (did you mean http://{url}?)" if "://" not in url else ""
        raise HubURLError(f"hub URL {url!r} needs an http:// or https:// scheme and a host{hint}")
    return url.rstrip("/")


def hub_urls(value: str) -> list[str]:
    """The hub replicas' URLs of `--hub URL1,URL2,…` (each checked; at most MAX_HUB_URLS, no
    empty item, no repeat), or HubURLError naming the bad one."""
    urls = [check_hub_url(u.strip()) for u in value.split(",")] if value.strip() else []
    if not urls:
        raise HubURLError("no hub URL given")
    if len(urls) > MAX_HUB_URLS:
        raise HubURLError(f"{len(urls)} hub URLs: at most {MAX_HUB_URLS}")
    if len(set(urls)) != len(urls):
        raise HubURLError(f"hub URL given twice in {value!r}")
    return urls


def check_hub_urls(value: str) -> str:
    """`--hub URL1,URL2,…` checked and normalized (comma-joined), or HubURLError."""
    return ",".join(hub_urls(value))


def transport_cause(exc: httpx.TransportError) -> str:
    """A short reason for a transport failure, e.g. 'connection refused'."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError) and "refused" in text.lower():
        return "connection refused"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    return text.split("] ")[-1][:120]


class HubClient:
    """Signed requests to a hub, or to several replicas of one (`base_url` = "URL1,URL2,…"):
    a connection error or a 5xx answer moves the client on to the next URL at once; only after
    every URL failed in a row does it wait (backoff), and it gives up after `retry_for_s` as with
    one URL. Signatures do not name the host, so a request is simply signed afresh for the next
    replica. `base_url` is the URL in use now."""

    def __init__(
        self,
        base_url: str,
        identity: Identity | None,  # None: unsigned reads only
        timeout_s: float = 60.0,
        retry_for_s: float | None = 120.0,
        stop: threading.Event | None = None,
        on_retry: RetryCallback | None = None,
        ca: str | Path | None = None,
    ) -> None:
        self.base_urls = hub_urls(base_url)
        self.identity = identity
        self.retry_for_s = retry_for_s
        self.stop = stop or threading.Event()
        self.on_retry = on_retry
        verify = tls_verify(ca)
        self.clients = [
            httpx.Client(base_url=url, timeout=timeout_s, verify=verify) for url in self.base_urls
        ]
        # each identity starts on its own replica (spread by key), then moves on as they fail
        spread = int.from_bytes(identity.public_key[:4], "big") if identity is not None else 0
        self.current = spread % len(self.clients)
        self.http = self.clients[self.current]
        self.timeout_s = timeout_s
        self._object_http: httpx.Client | None = None
        # heartbeat pacing (hub/pacing.py): the interval the hub last told (None: a hub that does
        # not pace, so a beat every DEFAULT_HEARTBEAT_S whatever else is sent), and when the hub
        # last answered a signed request (any counts as a sign of life) or a beat was tried
        self.heartbeat_s: float | None = None
        self.last_answer_at = time.monotonic()
        self.last_beat_at = time.monotonic()

    @property
    def base_url(self) -> str:
        return self.base_urls[self.current]

    def fail_over(self) -> bool:
        """Use the next replica's URL; False when there is only one."""
        if len(self.clients) < 2:
            return False
        self.current = (self.current + 1) % len(self.clients)
        self.http = self.clients[self.current]
        log.info("hub replica unavailable: trying %s", self.base_url)
        return True

    def close(self) -> None:
        for client in {id(c): c for c in [*self.clients, self.http]}.values():
            client.close()
        if self._object_http is not None:
            self._object_http.close()

    @property
    def object_http(self) -> httpx.Client:
        """For presigned object-store downloads: another host, so its own client (system CAs)
        that sends only what `_object_get` gives it and follows no redirects of its own; made
        on first use (most clients never download from a store)."""
        if self._object_http is None:
            self._object_http = httpx.Client(timeout=self.timeout_s)
        return self._object_http

    @object_http.setter
    def object_http(self, client: httpx.Client) -> None:
        """Use `client` for object-store downloads (a test's recording transport)."""
        self._object_http = client

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        params: dict | None = None,
        signed: bool = True,
        extra_headers: dict[str, str] | None = None,
        retry: bool = True,
        timeout_s: float | None = None,
    ) -> httpx.Response:
        """One signed request, retried as the client is configured; `retry=False` tries each
        replica once and raises `HubUnreachable` without waiting or announcing (a heartbeat:
        the next one follows in seconds, and the main loop already says the hub is down).
        `timeout_s`: this request's timeout instead of the client's (a long-poll)."""
        started = time.monotonic()
        give_up = None if self.retry_for_s is None else started + self.retry_for_s
        delay = 0.2
        failed_in_a_row = 0  # URLs that failed since the last answer or wait
        while True:
            headers = {"content-type": "application/octet-stream"} | (extra_headers or {})
            if signed:
                headers |= sign_request(self.identity, method, path, body)
            try:
                own_timeout = {} if timeout_s is None else {"timeout": timeout_s}
                response = self.http.request(
                    method, path, content=body, params=params, headers=headers, **own_timeout
                )
            except httpx.TransportError as exc:
                tls_error = tls_failure(self.base_url, exc)
                if tls_error is not None:
                    raise tls_error from exc
                cause = transport_cause(exc)
                if give_up is not None and time.monotonic() >= give_up:
                    raise HubUnreachable(self.base_url, cause, time.monotonic() - started) from exc
            else:
                if give_up is not None and time.monotonic() >= give_up:
                    break
                if _rate_limited(response):  # wait as told, then try again (fresh signature)
                    if self.stop.wait(min(float(response.headers["retry-after"]), 10.0)):
                        raise ClientStopped(f"stopped while retrying {method} {path}")
                    continue
                if response.status_code < 500:
                    break
                cause = f"hub answered {response.status_code}"
            failed_in_a_row += 1
            if failed_in_a_row < len(self.clients) and self.fail_over():
                continue  # another replica may answer now: no wait
            if not retry:
                raise HubUnreachable(self.base_url, cause, time.monotonic() - started)
            failed_in_a_row = 0
            self.fail_over()  # after the wait, start with the next one
            left_s = None if give_up is None else max(give_up - time.monotonic(), 0.0)
            if self.on_retry is not None:
                self.on_retry(cause, delay, left_s)
            if self.stop.wait(delay if left_s is None else min(delay, left_s)):
                raise ClientStopped(f"stopped while retrying {method} {path}")
            delay = min(delay * 2, 3.0)
        if signed and response.status_code < 400:
            self.last_answer_at = time.monotonic()  # the hub noted this node alive
        if response.status_code >= 400:
            detail, reason = response.text, None
            try:
                problem = response.json()
                detail = str(problem.get("detail", detail))
                reason = Refusal(problem["reason"]) if "reason" in problem else None
            except (ValueError, AttributeError):
                pass
            raise HubRequestError(response.status_code, detail, reason)
        return response

    def post_json(self, path: str, payload: object) -> dict:
        if isinstance(payload, BaseModel):
            body = payload.model_dump_json().encode()
        else:
            body = json.dumps(payload).encode()
        return self.request("POST", path, body).json()

    def healthz(self) -> None:
        """Returns once the hub answers (retrying as configured)."""
        self.request("GET", "/healthz", signed=False)

    # node calls
    def register(self, req: RegisterRequest) -> str:
        answer = RegisterResponse.model_validate(self.post_json(f"{API}/nodes/register", req))
        self.heartbeat_s = answer.heartbeat_s
        return answer.node_id

    def heartbeat(self, status: NodeStatus, run_id: str | None = None) -> None:
        """One try: a missed heartbeat is followed by the next, and retrying here would print
        a second countdown beside the main loop's while the hub is down. The answer's interval
        is used from now on (bounded by `HeartbeatResponse`)."""
        self.last_beat_at = time.monotonic()
        body = HeartbeatRequest(status=status, run_id=run_id).model_dump_json().encode()
        response = self.request("POST", f"{API}/nodes/heartbeat", body, retry=False)
        with contextlib.suppress(ValueError):  # an old hub's {"ok": true}: keep the interval
            told = HeartbeatResponse.model_validate_json(response.content).heartbeat_s
            if told is not None:
                self.heartbeat_s = told

    def heartbeat_due_in_s(self) -> float:
        """Seconds until the next heartbeat is due (<= 0: now). A pacing hub counts every
        signed request as a sign of life, so the interval runs from its last answer (or the
        last beat tried, so a hub that is down is not asked in a tight loop); a hub that does
        not pace gets a beat every DEFAULT_HEARTBEAT_S."""
        now = time.monotonic()
        if self.heartbeat_s is None:
            return DEFAULT_HEARTBEAT_S - (now - self.last_beat_at)
        return self.heartbeat_s - (now - max(self.last_answer_at, self.last_beat_at))

    def energy(self, report: EnergyReport) -> None:
        self.post_json(f"{API}/nodes/energy", report)

    def leave(self) -> None:
        self.request("POST", f"{API}/nodes/leave")

    def long_poll_s(self, wait_s: float) -> float:
        """How long to long-poll for work: `wait_s`, or the heartbeat interval the hub told
        when that is longer (at most MAX_LONG_POLL_S). A held long-poll is a sign of life, and
        each long-poll is one decision of the hub: 10,000 nodes polling every 10 s would be
        1,000 asks a second, so a hub that paces heartbeats for its swarm (hub/pacing.py)
        paces the asks of its waiting nodes with them."""
        return min(MAX_LONG_POLL_S, max(wait_s, self.heartbeat_s or 0.0))

    def assignment(self, run_id: str, wait_s: float = 10.0) -> AssignmentResponse:
        """Work, or the hub's answer after holding the request at most `wait_s`."""
        response = self.request(
            "POST",
            f"{API}/runs/{run_id}/assignment",
            params={"wait_s": wait_s},
            timeout_s=wait_s + self.timeout_s,
        )
        return AssignmentResponse.model_validate_json(response.content)

    def contribute(self, run_id: str, body: bytes) -> ContributionAck:
        response = self.request("POST", f"{API}/runs/{run_id}/contributions", body)
        return ContributionAck.model_validate_json(response.content)

    def report_failure(self, run_id: str, assignment_id: str, reason: str) -> dict:
        """Tell the hub this node could not train an assignment, and why."""
        printable = "".join(ch if ch.isprintable() else " " for ch in reason)  # one line
        payload = FailureReport(assignment_id=assignment_id, reason=printable[:MAX_REASON_CHARS])
        return self.post_json(f"{API}/runs/{run_id}/failures", payload)

    def blob(self, digest: str) -> bytes:
        """A whole blob (a dataset manifest, tokenizer or shard), from the hub or from the
        object store it redirects to, checked against its sha256."""
        response = self._blob_get(digest, None, MAX_OBJECT_BYTES)
        if response.status_code >= 300:
            raise BlobError(f"blob {digest}: the hub answered {response.status_code}")
        if sha256_hex(response.content) != digest:
            raise BlobError(f"downloaded blob does not match its hash {digest}")
        return response.content

    def _blob_get(self, digest: str, range_header: str | None, max_bytes: int) -> httpx.Response:
        """GET blob `digest` (or the Range of it) from the hub; when the hub answers 307, from
        the presigned object-store URL it names instead (at most `max_bytes` read), asking the
        hub for a fresh URL when the store fails (OBJECT_STORE_TRIES in all). HubRequestError
        as the hub answered."""
        path, extra = f"{API}/blobs/{digest}", {"range": range_header} if range_header else None
        want = 206 if range_header else 200
        for attempt in range(OBJECT_STORE_TRIES):
            response = self.request("GET", path, extra_headers=extra)
            if response.status_code != 307:
                return response
            try:
                return self._object_get(response, range_header, max_bytes, want)
            except ObjectStoreError:
                if attempt == OBJECT_STORE_TRIES - 1:
                    raise
                self.stop.wait(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    def _object_get(
        self, redirect: httpx.Response, range_header: str | None, max_bytes: int, want: int
    ) -> httpx.Response:
        """Follow the hub's 307 to a presigned object-store URL: a plain GET with only the
        `Range` header (never the node's signature headers), expecting status `want`, at most
        `max_bytes` read; returns the store's answer, read. ObjectStoreError (the
        caller asks the hub for a fresh URL) if the store does not answer as expected."""
        location = redirect.headers.get("location", "")
        if not location.startswith(("http://", "https://")) or len(location) > MAX_LOCATION_CHARS:
            raise ObjectStoreError(f"the hub redirected to an unusable URL {location[:80]!r}")
        headers = {"range": range_header} if range_header else {}
        try:
            with self.object_http.stream("GET", location, headers=headers) as response:
                if response.status_code != want:
                    raise ObjectStoreError(f"object store answered {response.status_code}")
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > max_bytes:
                        raise ObjectStoreError(f"object store sent more than {max_bytes} bytes")
                # what the caller reads: the body (already decoded) and where it lies in the blob
                kept = {k: v for k, v in response.headers.items() if k == "content-range"}
                return httpx.Response(want, headers=kept, content=bytes(body))
        except httpx.TransportError as exc:
            raise ObjectStoreError(f"object store: {transport_cause(exc)}") from exc

    def _range(self, digest: str, offset: int, chunk_bytes: int) -> tuple[bytes, str]:
        """Bytes of blob `digest` from `offset` (at most `chunk_bytes`) and their Content-Range,
        from the hub or the object store its 307 points to. HubRequestError as the hub answered
        (416 past the end)."""
        range_header = f"bytes={offset}-{offset + chunk_bytes - 1}"
        response = self._blob_get(digest, range_header, chunk_bytes)
        if response.status_code != 206 or len(response.content) > chunk_bytes:
            raise BlobError(f"blob {digest}: the hub did not serve bytes from {offset}")
        return response.content, response.headers.get("content-range", "")

    def fetch_blob(self, digest: str, part: Path, chunk_bytes: int = CHUNK_BYTES) -> int:
        """Download blob `digest` into the file `part` in Range chunks, resuming from what `part`
        already holds; returns the bytes downloaded by this call. Each chunk comes from the hub or
        from the presigned object-store URL the hub redirects it to. At the end the whole file
        must hash to `digest`: if not it is deleted and BlobError raised (the next call starts
        over), so wrong bytes from either source are never kept. The hash is taken as the
        bytes arrive (what `part` held before, first), not by reading the file again.
        """
        part.parent.mkdir(parents=True, exist_ok=True)
        offset = part.stat().st_size if part.exists() else 0
        downloaded, size = 0, None
        hashed = sha256_of_file(part) if offset else hashlib.sha256()
        with open(part, "ab") as f:
            while size is None or offset < size:
                try:
                    data, content_range = self._range(digest, offset, chunk_bytes)
                except HubRequestError as exc:
                    if exc.status != 416 or offset == 0:
                        raise
                    break  # nothing left past `offset`: the file is complete (or too long)
                match = _CONTENT_RANGE.match(content_range)
                if (
                    match is None
                    or int(match[1]) != offset
                    or int(match[2]) - offset + 1 != len(data)
                ):
                    raise BlobError(f"blob {digest}: bytes from {offset} did not come as asked")
                size = int(match[3])
                f.write(data)
                hashed.update(data)
                offset += len(data)
                downloaded += len(data)
                if not data:
                    raise BlobError(f"blob {digest}: empty range at {offset} of {size}")
        if hashed.hexdigest() != digest:
            part.unlink(missing_ok=True)
            raise BlobError(f"downloaded blob does not match its hash {digest}; discarded")
        return downloaded

    # sponsor and reader calls
    def create_run(self, config: dict) -> RunCreateResponse:
        return RunCreateResponse.model_validate(self.post_json(f"{API}/runs", {"config": config}))

    def change_run_state(self, run_id: str, event: str, reason: str = "") -> dict:
        """Pause, resume or stop a run (the sponsor's key signs)."""
        payload = RunStateRequest(event=event, reason=reason)  # type: ignore[arg-type]
        return self.post_json(f"{API}/runs/{run_id}/state", payload)

    def offer_dataset(self, offer: bytes) -> DatasetOfferResponse:
        """Offer a prepared dataset (a `DatasetOffer` as JSON, the sponsor's key signs): what
        the hub lacks of it, or its `manifest:<sha256>` once it lacks nothing."""
        response = self.request("POST", f"{API}/datasets", offer)
        return DatasetOfferResponse.model_validate_json(response.content)

    def upload_dataset_blob(self, manifest: str, digest: str, data: bytes) -> DatasetBlobAck:
        """Upload one tokenizer or shard of an offered dataset."""
        response = self.request("POST", f"{API}/datasets/{manifest}/blobs/{digest}", data)
        return DatasetBlobAck.model_validate_json(response.content)

    def push_weights(self, data: bytes) -> WeightsAck:
        """Push model weights (a safetensors file of one flat fp32 vector `theta`) to start
        runs from; the answer's `weights` is the name `model.init_weights` uses."""
        response = self.request("POST", f"{API}/weights", data)
        return WeightsAck.model_validate_json(response.content)

    def offer_weights(self, offer: WeightsOffer) -> WeightsOfferResponse:
        """Offer weights in parts: the parts the hub lacks, or `ack` once it has them all."""
        response = self.request("POST", f"{API}/weights/offer", offer.model_dump_json().encode())
        return WeightsOfferResponse.model_validate_json(response.content)

    def upload_weights_part(self, sha256: str, index: int, data: bytes) -> WeightsPartAck:
        """Upload part `index` of offered weights."""
        response = self.request("POST", f"{API}/weights/{sha256}/parts/{index}", data)
        return WeightsPartAck.model_validate_json(response.content)

    def runs(self) -> list[dict]:
        return self.request("GET", f"{API}/runs", signed=False).json()

    def run_status(self, run_id: str) -> dict:
        return self.request("GET", f"{API}/runs/{run_id}", signed=False).json()

    def run_report(self, run_id: str) -> dict:
        return self.request("GET", f"{API}/runs/{run_id}/report", signed=False).json()
