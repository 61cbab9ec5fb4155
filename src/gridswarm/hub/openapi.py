"""What the hub's OpenAPI document says beyond what FastAPI infers: every error response (the
`Problem` body) and every request body. The routes read their bodies themselves (size limit and
signature come before parsing), so each names its body with `openapi_body`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Path, Query
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gridswarm.protocol import MAX_LONG_POLL_S, MAX_ROUND, RUN_ID_PATTERN, Problem

MAX_WAIT_S = MAX_LONG_POLL_S  # the longest long-poll (60 s)

RunIdParam = Annotated[str, Path(pattern=RUN_ID_PATTERN, description="a run id")]
WaitParam = Annotated[
    float,
    Query(ge=0, le=MAX_WAIT_S, allow_inf_nan=False, description="long-poll for at most this"),
]


RoundParam = Annotated[int, Path(ge=0, le=MAX_ROUND)]
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "description": what}
    for status, what in {
        400: "malformed request or refused claim",
        401: "unsigned, badly signed or stale request",
        403: "not registered, not invited, not allowed, or not yours",
        404: "no such run, assignment or blob",
        409: "replayed, duplicate, stale or conflicting",
        413: "body over the size limit",
        422: "a field breaks its bound, or run settings refused",
        429: "quota, rate limit or registration limit (see Retry-After)",
    }.items()
}
BODY_MODELS: list[type[BaseModel]] = []  # request-body schemas the OpenAPI document must carry


def openapi_body(
    model: type[BaseModel] | None = None, binary: bool = False, required: bool = True
) -> dict[str, Any]:
    """`openapi_extra` naming a route's request body: a JSON model, or raw bytes (`binary`);
    the routes read their bodies themselves (size limit and signature come first)."""
    if binary:
        content = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    else:
        assert model is not None
        if model not in BODY_MODELS:
            BODY_MODELS.append(model)
        content = {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
        }
    return {"requestBody": {"required": required, "content": content}}


def install_openapi(app: FastAPI) -> None:
    """Serve an OpenAPI document with the request-body models in its components."""

    def document() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, defs = models_json_schema(
            [(model, "validation") for model in BODY_MODELS],
            ref_template="#/components/schemas/{model}",
        )
        doc.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        app.openapi_schema = doc
        return doc

    app.openapi = document  # type: ignore[method-assign]
