"""Who may do how much on a hub open to strangers: the sponsor allow-list, per-identity run
quotas and a per-key request rate limit.

- `gridswarm hub --sponsors FILE`: only these public keys may create and fund runs (403
  `not_sponsor` for anyone else). Without it anyone may, within the quotas.
- Quotas (`HubSettings.max_active_runs_per_identity`, `max_runs_per_hour_per_identity`): a key
  with too many active runs, or too many runs created in the last hour, gets 429 `quota`.
- Rate: every signed request spends one token of its key's bucket (`requests_per_s` sustained,
  `request_burst` at once); an empty bucket answers 429 `rate_limited` with Retry-After. The
  bucket is checked after the signature (a forger cannot drain someone else's bucket) and
  before the nonce is stored (a flood writes nothing).
- Replicas: a bucket lives in one process's memory, so with N hub processes sharing the
  database (`--workers` on this machine × `--replica-count` machines) each enforces 1/N of the
  rate and of the burst (`replica_share`). A key can then never get more than the configured
  total, whichever replicas it reaches; one that sticks to a single replica gets 1/N of it
  (a node keeps one connection, so one replica, far below its share). No shared state, and
  no database write per request.
- Pushed datasets (`gridswarm data push`, hub/datasets.py): who may push is who may create
  runs; each identity's datasets may take `--max-dataset-mb-per-identity` and all of them
  `--max-dataset-mb` of the blob store (`check_dataset_quota`).
- Node identities (keys are free): hub/registration.py bounds who may register.

The decisions are pure functions of the counts and an injected clock.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gridswarm.hub.errors import HubError
from gridswarm.protocol import Refusal

HOUR_S = 3600.0


def hourly_window(times_s: Iterable[float], limit: int, now_s: float) -> tuple[int, int | None]:
    """(events in the last hour, seconds until one more is allowed — None when it is now) for a
    bound of `limit` events per sliding hour."""
    recent = sorted((t for t in times_s if t > now_s - HOUR_S), reverse=True)
    if len(recent) < limit:
        return len(recent), None
    return len(recent), max(1, math.ceil(recent[limit - 1] + HOUR_S - now_s))


MAX_TRACKED_KEYS = 100_000  # rate-limiter memory bound: idle keys are forgotten first
MAX_REPLICA_COUNT = 64  # `gridswarm hub --replica-count`: hub machines sharing one database
MAX_RATE_PROCESSES = MAX_REPLICA_COUNT * 64  # × server.MAX_WORKERS processes on each
PUBLIC_KEY_HEX = re.compile(r"^[0-9a-f]{64}$")
# `gridswarm hub`'s bounds on new node identities (hub/registration.py; HubSettings' default
# RegistrationPolicy has none, for in-process and library use)
DEFAULT_REGISTER_PER_NET_HOUR = 32  # a lab behind one NAT registers this many nodes an hour
DEFAULT_MAX_NEW_NODES = 1000  # live node identities that have not worked yet
DEFAULT_MAX_DATASET_MB = 1024  # pushed datasets, all together (`gridswarm hub --max-dataset-mb`)
DEFAULT_MAX_DATASET_MB_PER_IDENTITY = 256  # and per sponsor key (`--max-dataset-mb-per-identity`)


def load_public_keys(path: Path, what: str) -> frozenset[str]:
    """An allow-list file: one Ed25519 public key (64 hex) per line; blank lines and # comments.
    ValueError (one line, naming the file and line) for anything else or an empty list."""
    keys = set()
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        key = line.split("#", 1)[0].strip().lower()
        if not key:
            continue
        if not PUBLIC_KEY_HEX.match(key):
            raise ValueError(f"{path}:{number}: not a public key (64 hex characters): {key[:80]!r}")
        keys.add(key)
    if not keys:
        raise ValueError(f"{path}: no {what} keys (an empty list would lock out every {what})")
    return frozenset(keys)


def load_sponsors(path: Path) -> frozenset[str]:
    """The sponsor allow-list (`--sponsors`), in `load_public_keys`' format."""
    return load_public_keys(path, "sponsor")


def check_sponsor(sponsors: frozenset[str] | None, public_key: bytes) -> None:
    """403 unless the hub is open (`sponsors` None) or the key is on its list."""
    if sponsors is not None and public_key.hex() not in sponsors:
        raise HubError(
            403,
            "this hub only accepts runs from its listed sponsors (--sponsors)",
            Refusal.NOT_SPONSOR,
        )


def check_run_quota(
    active_runs: int,
    runs_last_hour: list[float],
    now_s: float,
    max_active: int,
    max_per_hour: int,
) -> None:
    """429 `quota` when one identity has `max_active` active runs or created `max_per_hour` runs
    in the last hour (`runs_last_hour`: their creation times); Retry-After says when one frees."""
    if active_runs >= max_active:
        raise HubError(
            429,
            f"quota: {active_runs} active runs of this identity (at most {max_active}); "
            f"wait until one finishes",
            Refusal.QUOTA,
        )
    count, retry_s = hourly_window(runs_last_hour, max_per_hour, now_s)
    if retry_s is not None:
        raise HubError(
            429,
            f"quota: {count} runs created by this identity in the last hour "
            f"(at most {max_per_hour})",
            Refusal.QUOTA,
            headers={"Retry-After": str(retry_s)},
        )


@dataclass
class _Bucket:
    tokens: float
    updated_s: float


def replica_share(rate_per_s: float, burst: float, processes: int) -> tuple[float, float]:
    """(rate per s, burst) that each of `processes` hub processes enforces so that together they
    never allow a key more than `rate_per_s` sustained and `burst` at once: 1/processes of each.
    ValueError (one line) for a non-finite or non-positive rate, a process count outside
    [1, MAX_RATE_PROCESSES], or a share of the burst below one request (that
    process would refuse every request)."""
    if not (math.isfinite(rate_per_s) and rate_per_s > 0):
        raise ValueError(f"the request rate must be finite and > 0, got {rate_per_s}")
    if not (math.isfinite(burst) and burst > 0):
        raise ValueError(f"the request burst must be finite and > 0, got {burst}")
    if not 1 <= processes <= MAX_RATE_PROCESSES:
        raise ValueError(f"hub processes must be in [1, {MAX_RATE_PROCESSES}], got {processes}")
    if burst / processes < 1.0:
        raise ValueError(
            f"a burst of {burst:g} requests shared by {processes} hub process(es) leaves each less "
            f"than one request: raise --requests-per-s to at least {processes / 4:g} "
            f"(burst 4x) or run fewer processes"
        )
    return rate_per_s / processes, burst / processes


class RateLimiter:
    """A token bucket per key: `rate_per_s` sustained, `burst` at once (thread-safe); with
    `processes` > 1 this process's share of a limit that many hub processes enforce together
    (`replica_share`)."""

    def __init__(
        self,
        rate_per_s: float,
        burst: float,
        max_keys: int = MAX_TRACKED_KEYS,
        processes: int = 1,
    ) -> None:
        self.total_rate_per_s = rate_per_s
        self.processes = processes
        self.rate_per_s, self.burst = replica_share(rate_per_s, burst, processes)
        self.max_keys = max_keys
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def retry_after_s(self, key: str, now_s: float) -> float | None:
        """Spend one token of `key`'s bucket: None if there was one, else seconds until one."""
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) >= self.max_keys:
                    self._forget_idle(now_s)
                bucket = self._buckets[key] = _Bucket(self.burst, now_s)
            elapsed = max(now_s - bucket.updated_s, 0.0)
            bucket.tokens = min(self.burst, bucket.tokens + elapsed * self.rate_per_s)
            bucket.updated_s = now_s
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return None
            return (1.0 - bucket.tokens) / self.rate_per_s

    def check(self, key: str, now_s: float) -> None:
        """429 `rate_limited` with Retry-After when `key` has no token left."""
        wait_s = self.retry_after_s(key, now_s)
        if wait_s is not None:
            shared = (
                f" ({self.rate_per_s:g}/s at each of {self.processes} hub processes)"
                if self.processes > 1
                else ""
            )
            raise HubError(
                429,
                f"rate limited: more than {self.total_rate_per_s:g} requests/s from this key"
                + shared,
                Refusal.RATE_LIMITED,
                headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
            )

    def _forget_idle(self, now_s: float) -> None:
        """Drop buckets that have refilled (nothing to remember), else the oldest half."""
        full = [
            k
            for k, b in self._buckets.items()
            if b.tokens + (now_s - b.updated_s) * self.rate_per_s >= self.burst
        ]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) >= self.max_keys:
            by_age = sorted(self._buckets, key=lambda k: self._buckets[k].updated_s)
            for k in by_age[: len(by_age) // 2]:
                del self._buckets[k]


def check_dataset_quota(
    identity_bytes: int,
    hub_bytes: int,
    new_bytes: int,
    max_identity_bytes: int,
    max_hub_bytes: int,
    what: str = "this dataset would",
) -> None:
    """Refuse a pushed dataset (`gridswarm data push`) or pushed weights (`run create
    --init-from`), `what`, whose `new_bytes` would take this identity past `max_identity_bytes`
    (429 `quota`) or the hub's pushes past `max_hub_bytes` (413 `storage_full`);
    `identity_bytes`, `hub_bytes`: what was already allowed (datasets and weights together)."""
    mib = 1 << 20
    if identity_bytes + new_bytes > max_identity_bytes:
        raise HubError(
            429,
            f"quota: {what} take {new_bytes / mib:.1f} MiB and this identity has pushed "
            f"{identity_bytes / mib:.1f} of its {max_identity_bytes / mib:.1f} MiB "
            f"(hub --max-dataset-mb-per-identity)",
            Refusal.QUOTA,
        )
    if hub_bytes + new_bytes > max_hub_bytes:
        raise HubError(
            413,
            f"{what} take {new_bytes / mib:.1f} MiB and the hub holds "
            f"{hub_bytes / mib:.1f} of its {max_hub_bytes / mib:.1f} MiB for pushed datasets "
            f"and weights (--max-dataset-mb)",
            Refusal.STORAGE_FULL,
        )
