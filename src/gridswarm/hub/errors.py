"""The one error type of the hub: an HTTP status, a message for people and a typed reason.

Every refusal anywhere in the hub (service, trust, privacy, authentication, limits) raises
`HubError`; `hub/app.py` turns it into `{"detail": ..., "reason": ...}` (`protocol.Problem`) in
one handler. Code that needs to know why (the ledger's false-claim record, the node's duplicate
check) reads `reason`, never the message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from pydantic import ValidationError

from gridswarm.protocol import Refusal, describe_errors

MAX_DETAIL_CHARS = 2000
log = logging.getLogger("gridswarm.hub")
Item = TypeVar("Item")  # what one request of a batch carries (`decided_alone`)
Answer = TypeVar("Answer")
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


def decided_alone(
    scope: str, what: str, items: list[Item], decide: Callable[[list[Item]], list[Answer]]
) -> list[Answer | HubError]:
    """A batch (of `scope`: "run ID", or "hub" for registrations) whose decision failed for a
    reason that is not a refusal (a bug), decided again one item at a time (`decide([item])`),
    so that each failure stays with its own item: a failing item's answer is its HubError, or
    a 500. Called while that failure is handled (it is logged with its traceback)."""
    log.exception("%s: %d %s decided one by one", scope, len(items), what)
    answers: list[Answer | HubError] = []
    for item in items:
        try:
            answers.extend(decide([item]))
        except Exception as exc:  # this item's failure, not the others'
            log.exception("%s: one of the %s failed alone", scope, what)
            answers.append(exc if isinstance(exc, HubError) else HubError(500, "internal error"))
    return answers
