"""The operator's `GET /metrics` (hub/metrics.py) on the real app, in process: signed requests
count under their route template, refusals under their typed reason, a stranger's paths and
methods never make a new label, a round's close and its contribution are counted, the scrape
parses as Prometheus text, goes through the public reads' bounded gate, and `--no-metrics`
turns it off. The multiprocess mode of `--workers N` is checked with real forked processes."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import gridswarm.hub.app as app_module
from gridswarm.hub.metrics import NO_METRICS, RequestMetrics
from gridswarm.identity import Identity
from gridswarm.node.client import HubClient
from gridswarm.protocol import API
from tests.conftest import tiny_run, wait_for
from tests.hub.harness import Hub, hub_cli
from tests.hub.test_dashboard import NO_AUDITS, upload

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def hub(tmp_path: Path) -> Hub:
    return Hub(tmp_path)


def scrape(hub: Hub) -> Samples:
    """Every sample of one scrape, by (name, sorted labels); the text must parse."""
    r = hub.http.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def requests(samples: Samples, route: str, method: str, status: str) -> float:
    return value(
        samples, "gridswarm_http_requests_total", route=route, method=method, status=status
    )


def test_a_signed_request_counts_under_its_route_template(hub):
    node = Identity.generate()
    hub.register(node)
    before = scrape(hub)
    r = hub.post(node, f"{API}/nodes/heartbeat", {"status": "idle"})
    assert r.status_code == 200, r.text
    after = scrape(hub)
    route = f"{API}/nodes/heartbeat"
    assert requests(after, route, "POST", "2xx") == requests(before, route, "POST", "2xx") + 1
    latency = "gridswarm_http_request_duration_seconds_count"
    labels = {"route": route, "method": "POST", "status": "2xx"}
    assert value(after, latency, **labels) == value(before, latency, **labels) + 1
    # every signed request's nonce went through a group commit
    batches = "gridswarm_nonce_batch_size_count"
    assert value(after, batches) >= value(before, batches) + 1


def test_a_refusal_counts_under_its_reason(hub):
    stranger = Identity.generate()  # signs well, never registered
    before = scrape(hub)
    r = hub.post(stranger, f"{API}/nodes/heartbeat", {"status": "idle"})
    assert r.status_code == 403 and r.json()["reason"] == "forbidden", r.text
    unsigned = hub.http.post(f"{API}/nodes/heartbeat", content=b"{}")
    assert unsigned.json()["reason"] == "unauthenticated", unsigned.text
    after = scrape(hub)
    for reason in ("forbidden", "unauthenticated"):
        count = value(after, "gridswarm_refusals_total", reason=reason)
        assert count == value(before, "gridswarm_refusals_total", reason=reason) + 1, reason
    route = f"{API}/nodes/heartbeat"
    assert requests(after, route, "POST", "4xx") == requests(before, route, "POST", "4xx") + 2


def test_a_strangers_paths_and_methods_make_no_new_label(hub):
    scrape(hub)
    for _ in range(2):  # the first round of odd requests makes the (bounded) series they use
        tag = secrets.token_hex(8)
        assert hub.http.get(f"{API}/runs/{tag}").status_code == 404
        assert hub.http.get(f"/{tag}/{tag}").status_code == 404
        assert hub.http.request(f"X{tag[:6].upper()}", "/healthz").status_code == 405
        assert hub.http.get(f"{API}/blobs/{'0' * 64}").status_code == 404
        samples = scrape(hub)
        labels = {v for _, pairs in samples for _, v in pairs}
        assert not any(tag in label or tag.upper()[:6] in label for label in labels), labels
    series = set(scrape(hub))
    tag = secrets.token_hex(8)  # a second round of new ids: not one series more
    hub.http.get(f"{API}/runs/{tag}")
    hub.http.get(f"/{tag}/{tag}")
    hub.http.request(f"X{tag[:6].upper()}", "/healthz")
    assert set(scrape(hub)) == series
    assert requests(scrape(hub), f"{API}/runs/{{run_id}}", "GET", "4xx") >= 2
    assert requests(scrape(hub), "unmatched", "GET", "4xx") >= 2
    assert requests(scrape(hub), "/healthz", "other", "4xx") >= 2


def test_a_closed_round_and_its_contribution_are_counted(hub):
    node = Identity.generate()
    hub.register(node)
    run_id = hub.create_run(Identity.generate(), tiny_run(trust=dict(NO_AUDITS)))
    before = scrape(hub)
    assert value(before, "gridswarm_rounds_closed_total") == 0
    assert value(before, "gridswarm_live_nodes") == 0  # not counted yet (the tick counts)
    a = hub.assignment(node, run_id)
    assert a is not None
    upload(hub, node, run_id, a, seed=1)
    hub.service.ticker.tick()
    after = scrape(hub)
    assert value(after, "gridswarm_contributions_accepted_total") == 1
    assert value(after, "gridswarm_rounds_closed_total") == 1
    assert value(after, "gridswarm_round_close_seconds_count") == 1
    assert value(after, "gridswarm_round_close_seconds_sum") > 0
    assert value(after, "gridswarm_active_runs") == 1
    assert value(after, "gridswarm_heartbeat_interval_seconds") == 3.0
    assert value(after, "gridswarm_uploads_in_flight") == 0
    assert value(after, "gridswarm_live_nodes") == 1  # as the tick counted them
    route = f"{API}/runs/{{run_id}}/contributions"
    assert requests(after, route, "POST", "2xx") == 1


def test_no_metrics_answers_404_and_counts_nothing(tmp_path):
    hub = Hub(tmp_path, metrics=False)
    r = hub.http.get("/metrics")
    assert r.status_code == 404 and r.json()["reason"] == "not_found", r.text
    assert hub.register(Identity.generate())
    assert not any(m.cls is RequestMetrics for m in hub.app.user_middleware)
    assert hub.service.metrics is NO_METRICS and hub.service.nonces.observer is NO_METRICS


def test_a_scrape_goes_through_the_public_reads_gate(hub, monkeypatch):
    monkeypatch.setattr(app_module, "MAX_PUBLIC_READS_WAITING", 0)  # every public read: busy
    r = hub.http.get("/metrics")
    assert r.status_code == 429 and r.json()["reason"] == "busy", r.text
    assert r.headers["retry-after"] == "1"


MULTIPROCESS = textwrap.dedent(
    """
    import os, sys
    from gridswarm.hub.metrics import HubMetrics, process_ended, use_multiprocess
    use_multiprocess(sys.argv[1])
    children = []
    for i in range(2):
        ready, go = os.pipe(), os.pipe()  # child -> parent, parent -> child
        pid = os.fork()
        if pid == 0:
            m = HubMetrics()
            m.observe_request("/healthz", "GET", 200, 0.01)
            m.refused("busy")
            m.in_flight.inc()
            m.round_advanced("close", 0.5)
            os.write(ready[1], b"x")
            os.read(go[0], 1)  # until the parent has scraped
            os._exit(0)
        children.append((pid, ready[0], go[1]))
    for _, ready, _ in children:
        assert os.read(ready, 1) == b"x"
    print(HubMetrics().scrape().decode())
    print("----")
    for pid, _, go in children:
        os.write(go, b"x")
        os.waitpid(pid, 0)
        process_ended(pid)
    print(HubMetrics().scrape().decode())
    """
)


def test_replica_processes_share_one_scrape(tmp_path):
    """`--workers N`: what two forked replicas counted is in either's scrape; the in-flight
    gauge of a replica that ended stops counting, its counters stay."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    out = subprocess.run(
        [sys.executable, "-c", MULTIPROCESS, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    ).stdout
    live, ended = (
        {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(part)
            for s in family.samples
        }
        for part in out.split("----")
    )
    labels = {"route": "/healthz", "method": "GET", "status": "2xx"}
    for samples in (live, ended):
        assert value(samples, "gridswarm_http_requests_total", **labels) == 2
        assert value(samples, "gridswarm_refusals_total", reason="busy") == 2
        assert value(samples, "gridswarm_rounds_closed_total") == 2
        assert value(samples, "gridswarm_round_close_seconds_count") == 2
    assert value(live, "gridswarm_http_requests_in_flight") == 2
    assert value(ended, "gridswarm_http_requests_in_flight") == 0


@pytest.mark.slow
def test_a_real_nodes_round_shows_up_in_a_live_hubs_metrics(make_swarm):
    """A hub process and a node process: the node's round is in `gridswarm_rounds_closed`, its
    upload in the contributions route's count, the ticker's ticks in theirs."""
    swarm = make_swarm()
    swarm.start_hub()
    sponsor = HubClient(swarm.url, Identity.generate(), retry_for_s=30)
    run_id = sponsor.create_run(tiny_run(budget={"rounds": 3})).run_id
    swarm.start_node("n0", run_id)

    def live_scrape() -> Samples:
        r = httpx.get(f"{swarm.url}/metrics", timeout=30)
        assert r.status_code == 200, r.text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text)
            for s in family.samples
        }

    def closed() -> Samples | None:
        samples = live_scrape()
        return samples if value(samples, "gridswarm_rounds_closed_total") >= 1 else None

    samples = wait_for(closed, 120, "the node's round to close", poll_s=0.5)
    assert value(samples, "gridswarm_contributions_accepted_total") >= 1
    assert requests(samples, f"{API}/runs/{{run_id}}/contributions", "POST", "2xx") >= 1
    assert value(samples, "gridswarm_round_close_seconds_count") >= 1
    assert value(samples, "gridswarm_tick_seconds_count") >= 1


@pytest.mark.parametrize(("flag", "served"), [([], True), (["--no-metrics"], False)])
def test_the_hub_command_passes_no_metrics_to_the_server(tmp_path, monkeypatch, flag, served):
    result, calls = hub_cli(monkeypatch, "--blobs", str(tmp_path), *flag)
    assert result.exit_code == 0, result.output
    assert [kwargs["metrics"] for _, kwargs in calls] == [served]


def test_blob_totals_are_counted_once_whichever_sampler_reads_first():
    """The ticker and a scrape both sample `BlobCounters`; a sample that read older totals
    after a newer one was counted counts nothing again."""
    from gridswarm.hub.metrics import HubMetrics, HubState

    metrics = HubMetrics()

    def sample(served: int, served_bytes: int) -> None:
        blobs = {"served": served, "served_bytes": served_bytes, "redirected": 0}
        metrics.sample(HubState(0, 3.0, 0, 0, {}, blobs))

    for served, size in [(2, 200), (5, 500), (3, 300), (5, 500), (6, 650)]:
        sample(served, size)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.scrape().decode())
        for s in family.samples
    }
    assert value(samples, "gridswarm_blob_downloads_total", answer="served") == 6
    assert value(samples, "gridswarm_blob_served_bytes_total") == 650
    assert value(samples, "gridswarm_blob_downloads_total", answer="redirected") == 0
