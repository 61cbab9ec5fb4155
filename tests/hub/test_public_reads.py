"""Unsigned reads are anyone's to send, and some read a whole run or the whole ledger: they run
on their own few threads, and once too many wait for them the next is refused (429 `busy`,
Retry-After) instead of queueing without bound, while the swarm's signed requests go on."""

from __future__ import annotations

import asyncio
import threading

import httpx

from gridswarm.hub.app import MAX_PUBLIC_READS_WAITING, PUBLIC_READ_THREADS
from gridswarm.identity import Identity, sign_request
from gridswarm.protocol import API, HeartbeatRequest
from tests.conftest import tiny_run
from tests.hub.harness import Hub


def test_a_flood_of_public_reads_is_refused_while_nodes_are_answered(tmp_path):
    hub = Hub(tmp_path)
    run_id = hub.create_run(Identity.generate(), tiny_run())
    node = Identity.generate()
    hub.register(node)

    release, inside = threading.Event(), threading.Semaphore(0)
    status = hub.service.run_status

    def held_status(run: str) -> dict:  # a read that takes long: the threads stay busy
        inside.release()
        release.wait(30)
        return status(run)

    hub.service.run_status = held_status
    held = PUBLIC_READ_THREADS + MAX_PUBLIC_READS_WAITING

    async def flood() -> tuple[list[httpx.Response], httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=hub.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://hub") as client:
            reads = [asyncio.create_task(client.get(f"{API}/runs/{run_id}")) for _ in range(held)]
            for _ in range(PUBLIC_READ_THREADS):  # every public thread is inside a read
                assert await asyncio.to_thread(inside.acquire, True, 30)
            await asyncio.sleep(0.5)  # and the other reads wait for one
            refused = await client.get(f"{API}/ledger/verify")
            body = HeartbeatRequest(status="idle").model_dump_json().encode()
            path = f"{API}/nodes/heartbeat"
            headers = sign_request(node, "POST", path, body, now_s=hub.clock())
            beat = await client.post(path, content=body, headers=headers)
            release.set()
            return await asyncio.gather(*reads), refused, beat

    answered, refused, beat = asyncio.run(flood())
    assert refused.status_code == 429, refused.text
    assert refused.json()["reason"] == "busy" and refused.headers["retry-after"] == "1"
    assert beat.status_code == 200, beat.text  # the swarm's requests do not wait behind them
    assert [r.status_code for r in answered] == [200] * held  # every waiting read is answered
    assert all(r.json()["id"] == run_id for r in answered)
