"""The app factory: create_app(settings) wires the model, the adapter registry and the engine into the HTTP layer."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from prompt_server import __version__
from prompt_server.api import install_routes
from prompt_server.api.service import ModelInfo, Service
from prompt_server.config import Settings

log = logging.getLogger("prompt_server")


def build_service(settings: Settings) -> Service:
    """Load the model and the adapter store, start the engine; what the lifespan holds while serving."""
    import transformers

    from prompt_server.adapters.registry import AdapterRegistry
    from prompt_server.adapters.types import FAMILY_TASKS
    from prompt_server.engine.engine import Engine
    from prompt_server.model.loader import load_model, set_threads
    from prompt_server.model.memory import keep_freed_memory

    set_threads(settings.threads)
    if keep_freed_memory():  # model/memory.py: large tensors reuse freed memory instead of fresh pages
        log.debug("the C library's allocator keeps freed memory for reuse")
    loaded = load_model(settings.model, device=settings.device, dtype=settings.dtype, cache_dir=settings.cache_dir,
                        compile=settings.compile, native_kernels=settings.native_kernels,
                        cuda_graphs=settings.cuda_graphs)
    registry = AdapterRegistry(
        loaded.spec,
        device=loaded.device,
        dtype=loaded.dtype,
        store=settings.adapters,
        max_virtual_tokens=settings.max_virtual_tokens,
    )
    skipped = registry.load_store()
    for adapter_id, error in skipped:
        log.warning("adapter %s skipped: %s", adapter_id, error)
    engine = Engine(loaded, registry, settings)
    engine.start()
    config = loaded.model.config
    plan = loaded.plan
    info = ModelInfo(
        model_id=engine.model_id,
        dtype=str(loaded.dtype).removeprefix("torch."),
        device=str(loaded.device),
        path=str(loaded.path),
        architecture=(getattr(config, "architectures", None) or [type(loaded.model).__name__])[0],
        model_type=config.model_type,
        transformers_version=transformers.__version__,
        forward_path=plan.forward_path,
        forward_path_reason=plan.reason,
        forward_compiled=plan.compiled,
        forward_native_kernels=plan.native_kernels,
        forward_cuda_graphs=plan.cuda_graphs,
        max_position=plan.max_position,
        serving_notes=plan.notes,
        family=loaded.spec.family,
        tasks=FAMILY_TASKS[loaded.spec.family],
    )
    log.info("serving %s (%s) on %s (%s) with %d adapters; %s forward%s%s%s%s", info.model_id, info.architecture,
             info.device, info.dtype, len(registry), plan.forward_path, f" ({plan.reason})" if plan.reason else "",
             ", compiled" if plan.compiled else "", ", native kernels" if plan.native_kernels else "",
             ", CUDA graphs" if plan.cuda_graphs else "")
    for note in plan.notes:
        log.info("exactness: %s", note)
    return Service(engine, registry, settings, info, skipped)


def create_app(settings: Settings | None = None, service: Service | None = None) -> FastAPI:
    """A FastAPI app whose lifespan loads everything from `settings` (unless `service` is already built) and stops
    the engine on shutdown."""
    settings = settings or Settings()
    prebuilt = service

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = prebuilt or build_service(settings)
        app.state.service = service
        # What startup made lives as long as the server: the model's modules, the tokenizer's vocabulary, the
        # libraries (some 400k objects with the default model). Frozen, the cycle collector's full passes no longer
        # walk them. Such passes are rare while serving (one in six minutes of 32-client load), but each took
        # 250-280 ms on an AVX2 EPYC with the GIL held: every step and the event loop stood still meanwhile.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            service.engine.stop()
            gc.unfreeze()

    # With an API key the schema needs the key too, and the interactive docs are off: a browser cannot send it.
    keyed = settings.api_key is not None
    app = FastAPI(title="prompt-server", version=__version__, lifespan=lifespan,
                  openapi_url=None if keyed else "/openapi.json",
                  docs_url=None if keyed else "/docs", redoc_url=None if keyed else "/redoc")
    app.state.settings = settings
    install_routes(app, keyed_schema=keyed)
    return app
