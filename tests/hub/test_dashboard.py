"""hub/dashboard.py: the HTML pages of the runs and of one run, on an in-process hub (real app,
service, SQLite and signed requests): they show the public API's figures, keep hostile names
as text behind a script-free Content-Security-Policy, stay bounded, and refuse as the JSON API
does."""

from __future__ import annotations

import html
import math
import re
from pathlib import Path

import pytest
import torch
from markupsafe import escape
from sqlalchemy import update

from gridswarm.hub import dashboard
from gridswarm.hub import models as m
from gridswarm.identity import Identity
from gridswarm.protocol import API, Assignment, ContributionMeta
from gridswarm.train.codecs import make_codec
from gridswarm.train.params import pack
from tests.conftest import tiny_run
from tests.hub.harness import Hub, meta_fields

TOKENS_PER_STEP = 32 * 8  # tiny_run: seq_len x batch_size
HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>"
REGION = "<i>DE</i>"  # a node's claim, so anyone's
NO_AUDITS = {"audit_max_rate": 0, "audit_min_rate": 0}


@pytest.fixture
def hub(tmp_path: Path) -> Hub:
    return Hub(tmp_path)


def upload(hub: Hub, node: Identity, run_id: str, a: Assignment, seed: int) -> None:
    """An honest-looking contribution to `a`, its update drawn from `seed` (no two alike)."""
    update_ = torch.randn(hub.numel(run_id), generator=torch.Generator().manual_seed(seed)) * 1e-3
    fields = meta_fields(a, TOKENS_PER_STEP, energy_wh=0.25, region=REGION)
    body = pack(make_codec("int8").encode(update_), ContributionMeta(**fields).model_dump())
    r = hub.post(node, f"{API}/runs/{run_id}/contributions", body)
    assert r.status_code == 200, r.text


def run_with_rounds(hub: Hub, rounds: int, name: str = "tiny") -> tuple[str, Identity]:
    """A run with `rounds` closed rounds, each from one node's contribution."""
    node = Identity.generate()
    hub.register(node, name=HOSTILE[:64])
    run_id = hub.create_run(Identity.generate(), tiny_run(name=name, trust=dict(NO_AUDITS)))
    for number in range(rounds):
        a = hub.assignment(node, run_id)
        assert a is not None and a.round == number
        upload(hub, node, run_id, a, seed=number)
        hub.service.ticker.tick()
    return run_id, node


def page(hub: Hub, path: str, status: int = 200) -> str:
    r = hub.http.get(path)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    return r.text


def test_a_runs_page_shows_its_curve_and_its_numbers(hub):
    run_id, node = run_with_rounds(hub, 3)
    status = hub.get(f"{API}/runs/{run_id}").json()
    text = page(hub, f"/runs/{run_id}")
    points = re.search(r'<polyline[^>]* points="([^"]+)"', text).group(1).split()
    assert len(points) == len(status["curve"]) == 4  # versions 0..3
    ys = [float(p.split(",")[1]) for p in points]
    losses = [p["val_loss"] for p in status["curve"]]
    # the highest loss is drawn highest (smallest y), the lowest lowest
    assert ys.index(min(ys)) == losses.index(max(losses))
    assert ys.index(max(ys)) == losses.index(min(losses))
    assert f"<dd>{dashboard.num(losses[-1])}</dd>" in text  # the latest eval loss
    assert "4 of 4 evaluated versions drawn" in text
    assert text.count("<td>closed</td>") == 3 and "submitted 1" in text
    assert node.node_id in text and html.escape(REGION) in text
    # each node's energy: 3 contributions of 0.25 Wh
    assert '<td class="n">3</td><td class="n">15,360</td><td class="n">0.75</td>' in text
    runs = page(hub, "/")
    assert f'href="/runs/{run_id}"' in runs and dashboard.num(losses[-1]) in runs
    assert "1 run on this hub" in runs


def test_hostile_names_are_shown_as_text(hub):
    run_id, _ = run_with_rounds(hub, 1, name=HOSTILE)
    for path in ("/", f"/runs/{run_id}"):
        text = page(hub, path)
        assert HOSTILE not in text and HOSTILE[:64] not in text
        assert html.escape(HOSTILE) in text
        assert "<script" not in text and "<img" not in text  # as text only


def test_unknown_and_malformed_runs_are_refused_as_by_the_json_api(hub):
    for path, status in (("/runs/nosuchrun", 404), ("/runs/bad.id!", 422), ("/?page=0", 422)):
        text = page(hub, path, status)
        if path.startswith("/runs/"):
            api = hub.http.get(API + path)
            assert api.status_code == status
            assert str(escape(api.json()["detail"])) in text
            assert f"<code>{api.json()['reason']}</code>" in text
    assert "page" in page(hub, "/?page=abc", 422)
    assert hub.http.get("/runs/" + "a" * 65).status_code == 422  # over the id's 64 characters


def test_a_run_without_rounds_and_a_hub_without_runs_render(hub):
    assert "0 runs on this hub" in page(hub, "/")
    run_id = hub.create_run(Identity.generate(), tiny_run())
    text = page(hub, f"/runs/{run_id}")
    assert "No curve yet" in text and "No node has worked on this run yet" in text
    assert "<polyline" not in text
    assert f'href="/runs/{run_id}"' in page(hub, "/")


def test_a_run_whose_settings_no_longer_validate_still_renders(hub):
    run_id, _ = run_with_rounds(hub, 1)
    with hub.service.sessions() as s:  # e.g. written by an older hub (test_hostile does so)
        s.execute(update(m.Run).where(m.Run.id == run_id).values(config_json='{"train": null}'))
        s.commit()
    text = page(hub, f"/runs/{run_id}")
    assert "no longer validate" in text
    assert run_id in page(hub, "/")


def test_the_runs_list_is_paginated(hub, monkeypatch):
    monkeypatch.setattr(dashboard, "RUNS_PER_PAGE", 2)
    runs = [hub.create_run(Identity.generate(), tiny_run(name=f"run-{i}")) for i in range(3)]
    first, second = page(hub, "/"), page(hub, "/?page=2")
    assert [r in first for r in runs] == [False, True, True]  # newest first
    assert [r in second for r in runs] == [True, False, False]
    assert 'href="/?page=2"' in first and 'href="/?page=1"' in second
    assert "No runs on this page" in page(hub, "/?page=7")


def test_tables_are_capped_and_say_so(hub, monkeypatch):
    monkeypatch.setattr(dashboard, "MAX_TABLE_ROWS", 2)
    run_id, _ = run_with_rounds(hub, 2)
    text = page(hub, f"/runs/{run_id}")
    assert "2 of 3 rounds shown, newest first (at most 2)" in text  # 2 closed, 1 open
    assert text.count("<td>closed</td>") == 1


def test_the_pages_are_not_in_the_openapi_document(hub):
    paths = hub.get("/openapi.json").json()["paths"]
    assert "/" not in paths and "/runs/{run_id}" not in paths
    assert f"{API}/runs/{{run_id}}" in paths


# ------------------------------------------------------------ figures, without a hub


def test_missing_and_non_finite_figures_render_as_a_dash():
    for bad in (None, math.nan, math.inf, -math.inf, "7", True):
        assert dashboard.num(bad) == dashboard.DASH
        assert dashboard.when(bad) == dashboard.DASH
    assert dashboard.when(1e30) == dashboard.DASH
    row = dashboard.run_summary(
        {"id": "r", "name": None, "status": "active", "round": math.nan, "version": None},
        {"val_loss": [3.0, math.nan, None], "energy": {"energy_wh": math.inf}, "nodes": []},
    )
    assert row["loss"] == "3" and row["energy_wh"] == row["round"] == row["name"] == "–"
    assert dashboard.latest_loss({"val_loss": [math.nan, None]}) is None
    curve = [{"version": 0, "val_loss": math.nan}, {"version": 1, "val_loss": 2.0}]
    assert dashboard.loss_curve(curve) is None  # one finite point: nothing to draw
    flat = dashboard.loss_curve([{"version": v, "val_loss": 1.0} for v in range(3)])
    assert flat is not None and "nan" not in flat.points


def test_the_curve_is_downsampled_with_its_ends_kept():
    curve = [{"version": v, "val_loss": 5.0 - v * 1e-4} for v in range(20_000)]
    drawn = dashboard.loss_curve(curve)
    points = drawn.points.split()
    assert len(points) == drawn.shown <= dashboard.MAX_CURVE_POINTS and drawn.total == 20_000
    assert points[0] == "40.0,40.0" and points[-1] == "600.0,200.0"
    assert (drawn.version_first, drawn.version_last) == ("0", "19999")
    assert dashboard.downsample(5) == [0, 1, 2, 3, 4]
