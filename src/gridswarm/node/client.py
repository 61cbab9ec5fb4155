"""A signed HTTP client of the hub, used by nodes and by the sponsor CLI.

Requests are retried with backoff while the hub is unreachable (it may be restarting), each retry
freshly signed. A 4xx answer is final and raised as `HubRequestError` with the hub's reason.
"""

from __future__ import annotations

import json
import time

import httpx
from pydantic import BaseModel

from gridswarm.blobs import BlobError, sha256_hex
from gridswarm.identity import Identity, sign_request
from gridswarm.protocol import (
    API,
    AssignmentResponse,
    ContributionAck,
    EnergyReport,
    HeartbeatRequest,
    Refusal,
    RegisterRequest,
    RunCreateResponse,
)


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


class HubClient:
    def __init__(
        self, base_url: str, identity: Identity, timeout_s: float = 60.0, retry_for_s: float = 120.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.identity = identity
        self.retry_for_s = retry_for_s
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        params: dict | None = None,
        signed: bool = True,
    ) -> httpx.Response:
        give_up = time.monotonic() + self.retry_for_s
        delay = 0.2
        while True:
            headers = {"content-type": "application/octet-stream"}
            if signed:
                headers |= sign_request(self.identity, method, path, body)
            try:
                response = self.http.request(
                    method, path, content=body, params=params, headers=headers
                )
            except httpx.TransportError:
                if time.monotonic() >= give_up:
                    raise
            else:
                if time.monotonic() >= give_up:
                    break
                if _rate_limited(response):  # wait as told, then try again (fresh signature)
                    time.sleep(min(float(response.headers["retry-after"]), 10.0))
                    continue
                if response.status_code < 500:
                    break
            time.sleep(delay)
            delay = min(delay * 2, 3.0)
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

    # node calls
    def register(self, req: RegisterRequest) -> str:
        return self.post_json(f"{API}/nodes/register", req)["node_id"]

    def heartbeat(self, status: str, run_id: str | None = None) -> None:
        self.post_json(f"{API}/nodes/heartbeat", HeartbeatRequest(status=status, run_id=run_id))

    def energy(self, report: EnergyReport) -> None:
        self.post_json(f"{API}/nodes/energy", report)

    def leave(self) -> None:
        self.request("POST", f"{API}/nodes/leave")

    def assignment(self, run_id: str, wait_s: float = 10.0) -> AssignmentResponse:
        response = self.request(
            "POST", f"{API}/runs/{run_id}/assignment", params={"wait_s": wait_s}
        )
        return AssignmentResponse.model_validate_json(response.content)

    def contribute(self, run_id: str, body: bytes) -> ContributionAck:
        response = self.request("POST", f"{API}/runs/{run_id}/contributions", body)
        return ContributionAck.model_validate_json(response.content)

    def blob(self, digest: str) -> bytes:
        data = self.request("GET", f"{API}/blobs/{digest}").content
        if sha256_hex(data) != digest:
            raise BlobError(f"downloaded blob does not match its hash {digest}")
        return data

    # sponsor and reader calls
    def create_run(self, config: dict) -> RunCreateResponse:
        return RunCreateResponse.model_validate(self.post_json(f"{API}/runs", {"config": config}))

    def runs(self) -> list[dict]:
        return self.request("GET", f"{API}/runs", signed=False).json()

    def run_status(self, run_id: str) -> dict:
        return self.request("GET", f"{API}/runs/{run_id}", signed=False).json()

    def run_report(self, run_id: str) -> dict:
        return self.request("GET", f"{API}/runs/{run_id}/report", signed=False).json()
