"""The hub's read-only web dashboard: HTML pages of the runs (`GET /`) and of one run
(`GET /runs/{run_id}`), for sponsors and volunteers who would otherwise read JSON.

One read path: every figure comes from what the public, unsigned JSON API already returns
(`HubService.list_runs`, `run_status`, `run_report`; see `hub/reports.py`), read in one worker
thread per page like the JSON routes, without the service's lock; the dashboard writes nothing
and runs no SQL of its own. Pages are assembled here into plain view dicts (numbers already
formatted, the loss curve already scaled into SVG coordinates) and rendered by Jinja2 with
autoescape on, so run, node and region names (anyone's input on an open hub) are text.

A missed escape must still run nothing: every page is sent with a Content-Security-Policy that
allows no script, no external fetch, no form and no framing (`SECURITY_HEADERS`), and with
`X-Content-Type-Options: nosniff`. Output is bounded whatever the run: the curve is
downsampled to `MAX_CURVE_POINTS`, each table shows at most `MAX_TABLE_ROWS` rows (the page
says so), and the runs list is paginated by `RUNS_PER_PAGE`. Non-finite or missing numbers
render as "–". The routes are left out of the OpenAPI document (they are not an API).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, StrictUndefined
from pydantic import Field, TypeAdapter, ValidationError

from gridswarm.hub.errors import HubError
from gridswarm.hub.service import HubService
from gridswarm.protocol import RunId, describe_errors

DASH = "–"  # what a missing, NaN or infinite figure shows
REFRESH_S = 15  # the pages reload themselves (meta refresh): live without any script
RUNS_PER_PAGE = 20  # runs on one page of `GET /` (each costs one run_status read)
MAX_PAGE = 1_000_000
MAX_TABLE_ROWS = 100  # rows of any one table on a run's page
MAX_CURVE_POINTS = 300  # points of the eval-loss polyline
SVG_W, SVG_H, SVG_PAD = 640.0, 240.0, 40.0  # the curve's viewBox and its margin, in SVG units
SECURITY_HEADERS = {
    # no script of any kind, nothing fetched, no form, no framing: an escape that was missed
    # still runs nothing. Styles are inline (one <style> element); the curve is inline SVG.
    "content-security-policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
_RUN_ID = TypeAdapter(RunId)
_PAGE = TypeAdapter(Annotated[int, Field(ge=1, le=MAX_PAGE)])

_templates = Environment(
    loader=PackageLoader("gridswarm.hub", "templates"),
    autoescape=True,  # every template, whatever its name: names are anyone's input
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


# ------------------------------------------------------------------ figures


def finite(x: object) -> float | None:
    """`x` as a float if it is a finite real number (not a bool), else None."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    value = float(x)
    return value if math.isfinite(value) else None


def num(x: object, spec: str = ".4g") -> str:
    """`x` formatted with `spec`, or "–" when it is missing, NaN or infinite."""
    value = finite(x)
    if value is None:
        return DASH
    return format(int(value) if spec.endswith("d") else value, spec)


def when(t_s: object) -> str:
    """A Unix time (s) as UTC `YYYY-MM-DD HH:MM:SS`, or "–"."""
    value = finite(t_s)
    if value is None or not 0 <= value < 253402300800:  # before year 10000
        return DASH
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(value))


def text(x: object) -> str:
    """A name or reason as text (escaped by the template), or "–" when there is none."""
    return DASH if x is None or x == "" else str(x)


def latest_loss(status: Mapping[str, Any]) -> float | None:
    """The newest finite eval loss of a run's status, or None."""
    for loss in reversed(status.get("val_loss") or []):
        if finite(loss) is not None:
            return float(loss)
    return None


def capped(rows: Sequence[Any]) -> tuple[list[Any], int]:
    """The first `MAX_TABLE_ROWS` rows and how many there were."""
    return list(rows[:MAX_TABLE_ROWS]), len(rows)


# ------------------------------------------------------------------ the loss curve


@dataclass(frozen=True)
class Curve:
    """The eval-loss curve, scaled into the SVG's coordinates: `points` is the polyline's
    `points` attribute (numbers only), and the axes' labels are formatted figures."""

    points: str
    shown: int  # points drawn
    total: int  # finite points the run has
    loss_min: str
    loss_max: str
    version_first: str
    version_last: str
    last_x: float
    last_y: float


def downsample(n: int, limit: int = MAX_CURVE_POINTS) -> list[int]:
    """At most `limit` indices spread evenly over `range(n)`, the first and the last kept."""
    if n <= limit:
        return list(range(n))
    return sorted({round(i * (n - 1) / (limit - 1)) for i in range(limit)})


def loss_curve(curve: Sequence[Mapping[str, Any]]) -> Curve | None:
    """The run's eval loss per version as an SVG polyline, or None without two finite points
    (a run with no round closed yet has one: its initial version)."""
    pts = [
        (float(p["version"]), float(p["val_loss"]))
        for p in curve
        if finite(p.get("version")) is not None and finite(p.get("val_loss")) is not None
    ]
    if len(pts) < 2:
        return None
    pts = [pts[i] for i in downsample(len(pts))]
    xs, ys = [x for x, _ in pts], [y for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x_span = (x1 - x0) or 1.0
    y_span = (y1 - y0) or 1.0
    inner_w, inner_h = SVG_W - 2 * SVG_PAD, SVG_H - 2 * SVG_PAD

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            round(SVG_PAD + (x - x0) / x_span * inner_w, 1),
            round(SVG_PAD + (y1 - y) / y_span * inner_h, 1),
        )

    scaled = [at(x, y) for x, y in pts]
    return Curve(
        points=" ".join(f"{x:.1f},{y:.1f}" for x, y in scaled),
        shown=len(pts),
        total=sum(
            1
            for p in curve
            if finite(p.get("version")) is not None and finite(p.get("val_loss")) is not None
        ),
        loss_min=num(y0),
        loss_max=num(y1),
        version_first=num(x0, "d"),
        version_last=num(x1, "d"),
        last_x=scaled[-1][0],
        last_y=scaled[-1][1],
    )


# ------------------------------------------------------------------ pages as view dicts


def run_summary(run: Mapping[str, Any], status: Mapping[str, Any] | None) -> dict[str, Any]:
    """One row of the runs list: `list_runs`'s entry with figures from its `run_status`."""
    status = status or {}
    energy = status.get("energy") or {}
    nodes = status.get("nodes") or []
    return {
        "id": str(run["id"]),
        "name": text(run.get("name")),
        "state": text(run.get("status")),
        "version": num(run.get("version"), "d"),
        "round": num(run.get("round"), "d"),
        "tokens": num(run.get("tokens_total"), ",.0f"),
        "loss": num(latest_loss(status)),
        "nodes": num(len(nodes), "d") if status else DASH,
        "live": num(sum(n.get("state") == "live" for n in nodes), "d") if status else DASH,
        "energy_wh": num(energy.get("energy_wh"), ".3g"),
        "emissions_g": num(energy.get("emissions_g"), ".3g"),
    }


def index_view(service: HubService, page: int) -> dict[str, Any]:
    """The runs list, newest first, `RUNS_PER_PAGE` to a page; one `run_status` per run shown."""
    runs = list(reversed(service.list_runs()))
    pages = max(1, math.ceil(len(runs) / RUNS_PER_PAGE))
    shown = runs[(page - 1) * RUNS_PER_PAGE : page * RUNS_PER_PAGE]
    rows = []
    for run in shown:
        try:
            status = service.run_status(run["id"])
        except HubError:  # gone or unreadable since the list was read: its list entry only
            status = None
        rows.append(run_summary(run, status))
    return {
        "runs": rows,
        "total": len(runs),
        "page": page,
        "pages": pages,
        "per_page": RUNS_PER_PAGE,
        "refresh_s": REFRESH_S,
    }


def _outcome(assignments: Mapping[str, Any]) -> str:
    """A round's assignments by outcome, e.g. "submitted 2 · missed 1"."""
    return " · ".join(f"{k} {num(v, 'd')}" for k, v in sorted(assignments.items())) or DASH


def run_view(service: HubService, run_id: str) -> dict[str, Any]:
    """Everything one run's page shows, from its `run_status` and `run_report`."""
    status = service.run_status(run_id)  # 404 for an unknown run, as the JSON API
    try:
        report: Mapping[str, Any] = service.run_report(run_id)
    except HubError:  # e.g. its stored settings no longer validate: the page says so
        report = {}
    energy = status.get("energy") or {}
    trust = status.get("trust") or {}
    privacy = status.get("privacy") or {}
    trust_nodes = trust.get("nodes") or {}
    reported = energy.get("nodes") or {}  # each node's last energy report
    report_nodes = {n["id"]: n for n in report.get("nodes") or []}

    rounds, rounds_total = capped(list(reversed(status.get("rounds") or [])))
    round_rows = [
        {
            "number": num(r.get("number"), "d"),
            "status": text(r.get("status")),
            "attempts": num(r.get("attempts"), "d"),
            "outcome": _outcome(r.get("assignments") or {}),
            "close_reason": text(r.get("close_reason")),
            "opened_at": when(r.get("opened_at")),
            "closed_at": when(r.get("closed_at")),
        }
        for r in rounds
    ]
    by_tokens = sorted(status.get("nodes") or [], key=lambda n: -(finite(n.get("tokens")) or 0))
    nodes, nodes_total = capped(by_tokens)
    node_rows = []
    for n in nodes:
        rep = report_nodes.get(n["id"], {})
        earned = trust_nodes.get(n["id"], {})
        emissions_kg = finite(rep.get("emissions_kg"))
        node_rows.append(
            {
                "id": text(n.get("id")),
                "name": text(n.get("name")),
                "state": text(n.get("state")),
                "region": text(rep.get("region") or reported.get(n["id"], {}).get("region")),
                "contributions": num(n.get("contributions"), "d"),
                "tokens": num(n.get("tokens"), ",.0f"),
                "energy_wh": num(n.get("energy_wh"), ".3g"),
                "emissions_g": num(None if emissions_kg is None else emissions_kg * 1000, ".3g"),
                "g_per_1k": num(rep.get("g_per_1k_tokens"), ".3g"),
                "failures": num(n.get("failures"), "d"),
                "last_failure": text(n.get("last_failure")),
                "earned": num(earned.get("earned_units"), ",.0f"),
                "reputation": num(earned.get("reputation"), ".3g"),
            }
        )
    total = report.get("total") or {}
    agnostic_kg = finite(report.get("agnostic_emissions_kg"))
    reduction = finite(report.get("reduction_vs_agnostic"))
    return {
        "id": str(status.get("id", run_id)),
        "name": text(status.get("name")),
        "state": text(status.get("status")),
        "reason": text(status.get("status_reason")),
        "error": text(status.get("error")) if status.get("error") else None,
        "round": num(status.get("round"), "d"),
        "version": num(status.get("version"), "d"),
        "tokens": num(status.get("tokens_total"), ",.0f"),
        "loss": num(latest_loss(status)),
        "numel": num(status.get("numel"), ",.0f"),
        "bytes_up": num(status.get("bytes_up_total"), ",.0f"),
        "bytes_down": num(status.get("bytes_down_total"), ",.0f"),
        "bytes_sync": num(status.get("bytes_sync_dp_equivalent"), ",.0f"),
        "curve": loss_curve(status.get("curve") or []),
        "rounds": round_rows,
        "rounds_total": rounds_total,
        "nodes": node_rows,
        "nodes_total": nodes_total,
        "energy": {
            "policy": text(energy.get("policy") or report.get("policy")),
            "energy_wh": num(energy.get("energy_wh"), ".3g"),
            "emissions_g": num(energy.get("emissions_g"), ".3g"),
            "g_per_1k": num(energy.get("g_per_1k_tokens"), ".3g"),
            "local_share": num(energy.get("local_surplus_share"), ".0%"),
            "deadline_at": when(energy.get("deadline_at")),
            "tokens_target": num(energy.get("tokens_target"), ",.0f"),
        },
        "carbon": {
            "emissions_kg": num(total.get("emissions_kg"), ".3g"),
            "agnostic_kg": num(agnostic_kg, ".3g"),
            "reduction": DASH if reduction is None else f"{abs(reduction):.1%}",
            "less": reduction is not None and reduction >= 0,
            "unmetered": num(report.get("unmetered"), "d"),
            "contributions": num(report.get("contributions"), "d"),
        },
        "escrow": {
            "funded": num(trust.get("funded_units"), ",.0f"),
            "rewarded": num(trust.get("rewarded_units"), ",.0f"),
            "forfeited": num(trust.get("forfeited_units"), ",.0f"),
            "available": num(trust.get("escrow_units"), ",.0f"),
            "audited": num(trust.get("audited"), "d"),
            "audits_failed": num(trust.get("audits_failed"), "d"),
            "rejected": num(trust.get("rejected"), "d"),
            "audits": text(trust.get("audits")),
        },
        "privacy": None
        if not privacy
        else {
            "epsilon": num(privacy.get("epsilon"), ".3g"),
            "budget": num(privacy.get("epsilon_budget"), ".3g"),
            "delta": num(privacy.get("delta"), ".3g"),
            "secagg": "yes" if privacy.get("secagg") else "no",
            "stop_reason": text(privacy.get("stop_reason")),
        },
        "max_rows": MAX_TABLE_ROWS,
        "max_points": MAX_CURVE_POINTS,
    }


# ------------------------------------------------------------------ rendering and routes


def render(template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """`template` rendered with `context`, sent with the dashboard's security headers."""
    context.setdefault("refresh_s", REFRESH_S)
    html = _templates.get_template(template).render(**context)
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)


def error_page(exc: HubError) -> HTMLResponse:
    """A refusal as a small HTML page: the JSON API's status, detail and reason."""
    body = exc.body()
    return render(
        "error.html", exc.status, status=exc.status, detail=body["detail"], reason=body["reason"]
    )


def _checked(adapter: TypeAdapter, value: str, name: str, where: str) -> Any:
    """`value` validated by `adapter`, or the JSON API's 422 for the same malformed field."""
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        errors = [e | {"loc": (where, name)} for e in exc.errors()]
        raise HubError(422, f"malformed request: {describe_errors(errors)}") from exc


def add_dashboard_routes(
    app: FastAPI, service: HubService, public_read: Callable[..., Awaitable[Any]]
) -> None:
    """Mount `GET /` (the runs) and `GET /runs/{run_id}` (one run), outside the OpenAPI
    document. Each page is one call on the public reads' threads (`public_read`, hub/app.py:
    429 `busy` when too many wait): read through the public API's service methods, then
    render."""

    @app.get("/", include_in_schema=False)
    async def runs_page(request: Request) -> HTMLResponse:
        try:
            raw_page = request.query_params.get("page", "1")
            page = _checked(_PAGE, raw_page[:32], "page", "query")

            def build() -> HTMLResponse:
                return render("runs.html", **index_view(service, page))

            return await public_read(build)
        except HubError as exc:
            return error_page(exc)

    @app.get("/runs/{run_id}", include_in_schema=False)
    async def run_page(run_id: str) -> HTMLResponse:
        try:
            checked = _checked(_RUN_ID, run_id, "run_id", "path")

            def build() -> HTMLResponse:
                return render("run.html", run=run_view(service, checked))

            return await public_read(build)
        except HubError as exc:
            return error_page(exc)
