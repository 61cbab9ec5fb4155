"""A Sybil flood against an open hub: N signed registrations of fresh node keys from one client
network, then one from another network. In-process (the real app, service and SQLite database,
real Ed25519 signatures through Starlette's test transport): what a refusal costs the hub
against an accepted registration, and that the hub still answers others.

    python bench/registration_flood.py --flood 500 --per-net 32 [--out flood.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from fastapi.testclient import TestClient

from gridswarm.hub.app import create_app
from gridswarm.hub.registration import RegistrationPolicy
from gridswarm.hub.server import build_service
from gridswarm.hub.service import HubSettings
from gridswarm.identity import Identity, sign_request
from gridswarm.protocol import API

REGISTER = f"{API}/nodes/register"
BODY = json.dumps({"probe_tokens_per_s": 1e5, "probe_numel": 1000}).encode()


def register(client: TestClient) -> tuple[int, float]:
    """One signed registration of a fresh key: (HTTP status, seconds)."""
    who = Identity.generate()
    started = time.perf_counter()
    r = client.post(REGISTER, content=BODY, headers=sign_request(who, "POST", REGISTER, BODY))
    return r.status_code, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flood", type=int, default=500, help="registrations from one network")
    parser.add_argument("--per-net", type=int, default=32, help="--register-per-net-hour")
    parser.add_argument("--max-new-nodes", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="gridswarm-flood-"))
    policy = RegistrationPolicy(per_network_per_hour=args.per_net, max_new_nodes=args.max_new_nodes)
    service = build_service(
        f"sqlite:///{root / 'hub.db'}", root / "blobs", HubSettings(registration=policy)
    )
    app = create_app(service)
    flood = TestClient(app, client=("203.0.113.9", 50000))
    seconds: dict[int, list[float]] = {}
    started = time.perf_counter()
    for _ in range(args.flood):
        status, took_s = register(flood)
        seconds.setdefault(status, []).append(took_s)
    wall_s = time.perf_counter() - started
    other_status, other_s = register(TestClient(app, client=("192.0.2.1", 50000)))
    result = {
        "flood": args.flood,
        "per_net": args.per_net,
        "wall_s": round(wall_s, 3),
        "by_status": {
            str(k): {"count": len(v), "median_ms": round(1e3 * statistics.median(v), 2)}
            for k, v in sorted(seconds.items())
        },
        "other_network": {"status": other_status, "ms": round(1e3 * other_s, 2)},
    }
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
