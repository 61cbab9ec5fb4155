"""Who may register a node identity: the hub's bounds on Sybils.

Node keys are free (an Ed25519 key per node), so every per-key limit (hub/limits.py) can be
multiplied by making more keys. An operator bounds the identities themselves, at registration
(`POST /v1/nodes/register`), with one of:

- invites (`gridswarm hub --node-invites FILE`): only the listed public keys (hex, one a line,
  # comments) may register (403 `not_invited`); a listed key is the operator's, so neither
  bound below applies to it. A registered key that is taken off the list can neither register
  again nor take a place in a round (hub/trust.py `admission`).
- an open hub's bounds on *new* identities (429 `registration_limited` with Retry-After):
  - per client network (IPv4 /24, IPv6 /64) at most `per_network_per_hour` new node keys in
    any hour (`--register-per-net-hour`). The network is that of the peer address the ASGI
    server sees: behind a reverse proxy that is the proxy's, unless the hub is told to believe
    the proxy's X-Forwarded-For (`--forwarded-allow-ips`); it never believes it otherwise.
  - at most `max_new_nodes` live identities that have never worked (`--max-new-nodes`): a
    flood from many networks fills this, not the hub's tables and rounds.

A key already registered (a node restarting) is never refused by either bound. Refusals are
decided before anything is stored: `precheck` runs after the signature and the per-key rate
limit but before the request's nonce is written, and `check` again, under the service's lock,
before the node's row is added (the authoritative one: concurrent registrations of one process
cannot both take the last place; replicas may overshoot by one each).

"Worked" (`proven_nodes`): the node has an accepted contribution in a closed round, i.e. one
that was aggregated (uploads refused by an audit are marked rejected before the close). Round
places prefer such nodes over never-worked ones (trust/policy.py `may_select`), and never-worked
ones hold at most the run's `round.max_newcomer_share` of them (`newcomers_placed`).

This module decides; the reads it decides on (and `proven_nodes`, `newcomers_placed`,
`new_nodes_live`) are in hub/store/registration.py.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from gridswarm.hub.errors import HubError
from gridswarm.hub.limits import HOUR_S, hourly_window
from gridswarm.hub.store import registration as store

# re-exported: hub/trust.py imports them from here (its own move is another change)
from gridswarm.identity import node_id_from_public_key
from gridswarm.protocol import Refusal

IPV4_PREFIX = 24  # one client network: an IPv4 /24 (a home, an office, a small hoster's range)
IPV6_PREFIX = 64  # an IPv6 /64 (one end site's subnet)
MAX_NETWORK_CHARS = 64  # `nodes.register_net`


@dataclass(frozen=True)
class RegistrationPolicy:
    """The operator's bounds; 0 turns a bound off. `invites` None: an open hub."""

    invites: frozenset[str] | None = None  # public keys (64 hex, lower case)
    per_network_per_hour: int = 0
    max_new_nodes: int = 0

    def __post_init__(self) -> None:
        if self.per_network_per_hour < 0 or self.max_new_nodes < 0:
            raise ValueError("registration bounds must be >= 0 (0: no bound)")


def client_network(host: str | None) -> str | None:
    """The client network of a peer address: its IPv4 /24 or IPv6 /64 (an IPv4-mapped IPv6
    address counts as IPv4). A peer that is not an IP address (a test client, a Unix socket)
    is a network of its own name; None when the server gave no address."""
    if not host:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"host:{host}"[:MAX_NETWORK_CHARS]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = IPV4_PREFIX if address.version == 4 else IPV6_PREFIX
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def check_invited(invites: frozenset[str] | None, public_key_hex: str) -> None:
    """403 `not_invited` unless the hub is open (`invites` None) or the key is listed."""
    if invites is not None and public_key_hex not in invites:
        raise HubError(
            403,
            "this hub admits only the node keys its operator invited (--node-invites); "
            f"ask the operator to add {public_key_hex}",
            Refusal.NOT_INVITED,
        )


def check_new_identity(
    policy: RegistrationPolicy,
    network: str | None,
    recent_from_network: list[float],
    new_live: int,
    now_s: float,
    liveness_s: float,
) -> None:
    """429 `registration_limited` when a new identity would break a bound (pure).

    `recent_from_network`: registration times of the network's newest identities (at least
    `per_network_per_hour` of them when there are); `new_live`: live never-worked identities."""
    limit = policy.per_network_per_hour
    count, retry_s = hourly_window(recent_from_network, limit, now_s) if limit else (0, None)
    if network is not None and retry_s is not None:
        raise HubError(
            429,
            f"registration limited: {count} new node identities from network {network} "
            f"in the last hour (at most {limit}); try again in {retry_s} s, or ask the hub's "
            "operator to raise --register-per-net-hour or to invite your node keys",
            Refusal.REGISTRATION_LIMITED,
            headers={"Retry-After": str(retry_s)},
        )
    if policy.max_new_nodes and new_live >= policy.max_new_nodes:
        retry_s = max(1, math.ceil(liveness_s))
        raise HubError(
            429,
            f"registration limited: {new_live} live node identities have not worked yet (at "
            f"most {policy.max_new_nodes}, --max-new-nodes); try again in {retry_s} s",
            Refusal.REGISTRATION_LIMITED,
            headers={"Retry-After": str(retry_s)},
        )


class RegistrationGate:
    """The bounds of `RegistrationPolicy` over the hub's `nodes` table."""

    def __init__(
        self,
        policy: RegistrationPolicy,
        sessions: sessionmaker,
        liveness_s: float | Callable[[float], float],
        clock: Callable[[], float],
    ) -> None:
        self.policy = policy
        self.sessions = sessions
        # the hub's liveness window at a time (it grows while heartbeats are paced), or a fixed one
        self.liveness_s = liveness_s if callable(liveness_s) else lambda _now: liveness_s
        self.clock = clock

    @property
    def bounded(self) -> bool:
        p = self.policy
        return p.invites is not None or bool(p.per_network_per_hour or p.max_new_nodes)

    def precheck(self, public_key: bytes, peer: str | None) -> None:
        """The checks of `check` in a read-only transaction of their own: a refused request
        is answered before its nonce is stored, so a refused flood writes nothing."""
        if not self.bounded:
            return
        with self.sessions() as s:
            known = store.is_registered(s, node_id_from_public_key(public_key))
            self.check(s, public_key.hex(), client_network(peer), known, self.clock())

    def check(
        self, s: Session, public_key_hex: str, network: str | None, known: bool, now_s: float
    ) -> None:
        """Refuse (HubError) a registration that the policy does not allow; reads only."""
        if self.policy.invites is not None:
            check_invited(self.policy.invites, public_key_hex)
            return  # an invited key is the operator's: no bound on it
        if known or not self.bounded:
            return  # a node restarting with its key is never refused
        recent: list[float] = []
        limit = self.policy.per_network_per_hour
        if limit and network is not None:
            recent = store.recent_registrations(s, network, now_s - HOUR_S, limit)
        new_live = 0
        network_full = bool(limit) and len(recent) >= limit  # refused without counting
        if self.policy.max_new_nodes and not network_full:
            new_live = store.new_nodes_live(s, now_s - self.liveness_s(now_s))
        check_new_identity(self.policy, network, recent, new_live, now_s, self.liveness_s(now_s))
