"""HTTP layer: routes, schemas, auth, errors. Reaches the engine only through app.state.service; no torch."""

from __future__ import annotations

from fastapi import Depends, FastAPI

from prompt_server.api import errors
from prompt_server.api.deps import require_api_key
from prompt_server.api.middleware import BodyLimit, RequestCounter
from prompt_server.api.routes import adapters, classify, generate, meta, openai


def install_routes(app: FastAPI, keyed_schema: bool = False) -> None:
    """Mount every route, the error handlers, the body limit and the request counter on `app`; `keyed_schema` adds a
    GET /openapi.json that needs the API key (for an app built without FastAPI's open one)."""
    errors.install(app)
    keyed = [Depends(require_api_key)]
    app.include_router(meta.open_router)
    app.include_router(meta.router)
    if keyed_schema:
        app.include_router(meta.schema_router)
    app.include_router(generate.router, dependencies=keyed)
    app.include_router(openai.router, dependencies=keyed)
    app.include_router(classify.router, dependencies=keyed)
    app.include_router(adapters.router, dependencies=keyed)
    app.add_middleware(BodyLimit)
    app.add_middleware(RequestCounter)  # added last, so outermost: it counts the body limit's 413s too
