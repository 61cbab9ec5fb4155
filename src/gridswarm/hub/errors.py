"""The one error type of the hub: an HTTP status, a message for people and a typed reason.

Every refusal anywhere in the hub (service, trust, privacy, authentication, limits) raises
`HubError`; `hub/app.py` turns it into `{"detail": ..., "reason": ...}` (`protocol.Problem`) in
one handler. Code that needs to know why (the ledger's false-claim record, the node's duplicate
check) reads `reason`, never the message.
"""

from __future__ import annotations

from pydantic import ValidationError

from gridswarm.protocol import Refusal, describe_errors

MAX_DETAIL_CHARS = 2000
DEFAULT_REASONS = {
    400: Refusal.MALFORMED,
    401: Refusal.UNAUTHENTICATED,
    403: Refusal.FORBIDDEN,
    404: Refusal.NOT_FOUND,
    405: Refusal.MALFORMED,
    409: Refusal.CONFLICT,
    413: Refusal.TOO_LARGE,
    422: Refusal.MALFORMED,
    429: Refusal.RATE_LIMITED,
}


class HubError(Exception):
    """A request the hub refuses: `status` is the HTTP code, `detail` says why in words and
    `reason` in a code (by default the usual one for the status)."""

    def __init__(
        self,
        status: int,
        detail: str,
        reason: Refusal | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.reason = reason or DEFAULT_REASONS.get(status, Refusal.UNAVAILABLE)
        self.headers = headers or {}

    def body(self) -> dict[str, str]:
        """The JSON error body (`protocol.Problem`)."""
        detail = self.detail[:MAX_DETAIL_CHARS].encode("utf-8", "backslashreplace").decode()
        return {"detail": detail, "reason": self.reason.value}


class UnreadableSettings(HubError):
    """A run whose stored settings no longer validate (say, a plugin they name was uninstalled):
    requests about it get 409 and the ticker stalls it at once (retrying cannot help), while
    every other run goes on."""

    def __init__(self, run_id: str, exc: ValidationError) -> None:
        super().__init__(
            409,
            f"run {run_id}: its stored settings no longer validate "
            f"({describe_errors(exc.errors())})",
            Refusal.UNREADABLE_SETTINGS,
        )
