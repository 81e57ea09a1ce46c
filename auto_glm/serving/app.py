"""``create_app``: the FastAPI application around the server's model table."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import auto_glm
from auto_glm.engine.client import EngineClient
from auto_glm.fleet import ModelTable, ServedVersion
from auto_glm.fleet.metrics import ModelTableCollector
from auto_glm.observability import install_observability
from auto_glm.serving import (
    admin_models,
    admin_routes,
    native_routes,
    openai_routes,
    version_routes,
)
from auto_glm.serving.admission import Admission
from auto_glm.serving.config import ServerConfig
from auto_glm.serving.docs import install_docs
from auto_glm.serving.errors import install_error_handlers
from auto_glm.serving.guards import RequestGuards, is_loopback
from auto_glm.serving.media import ImageLoader
from auto_glm.serving.preprocess import Preprocessor
from auto_glm.serving.state import ServingState
from auto_glm.serving.tenancy import Tenancy
from auto_glm.tenants import TenantStore, keys
from auto_glm.tenants.quotas import QuotaBook

__all__ = ["create_app", "served_model_name"]

log = logging.getLogger("auto_glm.serving")


def served_model_name(engine: EngineClient, config: ServerConfig) -> str:
    """``served_model_name``, else the model directory's name (what `/v1/models` lists)."""
    return config.served_model_name or engine.loaded.path.name


def _labels(served: ServedVersion) -> dict[str, str]:
    return {"model": served.model, "version": served.version, "replica": ""}


def create_app(
    models: ModelTable | EngineClient, config: ServerConfig, quotas: QuotaBook | None = None
) -> FastAPI:
    """An app serving ``models`` (or one engine, under :func:`served_model_name`); the caller
    owns the engines and shuts them down (:meth:`ModelTable.close`). Tenants' budgets are
    kept in ``quotas`` (default: in this process).

    ``app.state.serving`` (:class:`ServingState`) gives the admission controller that
    :class:`~auto_glm.serving.service.GLMService` drains on shutdown.
    """
    if isinstance(models, EngineClient):
        models = ModelTable.single(served_model_name(models, config), models)
    table = models
    preprocessor = Preprocessor(config.max_prompt_chars, ImageLoader.from_config(config))
    admin_key = config.admin_key.get_secret_value() if config.admin_key else None
    tenancy = Tenancy(TenantStore(config.database_url), config.auth, admin_key, quotas)
    if not tenancy.required and not is_loopback(config.host):
        log.warning(
            "serving on %s without API keys: anyone who reaches the port can use the model; "
            "create a tenant and a key (autoglm tenants create, autoglm keys create) or set "
            "auth=required",
            config.host,
        )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        table.attach(asyncio.get_running_loop())
        yield
        preprocessor.close()
        tenancy.close()

    app = FastAPI(
        lifespan=lifespan,
        title="Open-AutoGLM",
        version=auto_glm.__version__,
        description="OpenAI-compatible LLM server on the Open-AutoGLM engine. Errors are "
        '`{"error": {"message", "type", "param", "code"}}`.',
        docs_url=None,  # install_docs serves the docs pages without a CDN
        redoc_url=None,
    )
    admission = Admission(
        config.max_queued_requests, config.request_timeout, tenancy, config.stream_interval
    )
    tenancy.quotas.follow(admission.tenant_loads)
    app.state.serving = ServingState(
        table=table,
        config=config,
        admission=admission,
        preprocessor=preprocessor,
        tenancy=tenancy,
    )
    install_error_handlers(app)
    app.add_middleware(
        RequestGuards,
        max_bytes=int(config.max_request_bytes),
        check_host=is_loopback(config.host) or bool(config.allowed_hosts),
        allowed_hosts=config.allowed_hosts,
        metrics_key=admin_key if config.metrics_auth else None,
    )
    app.include_router(openai_routes.router)
    app.include_router(native_routes.router)
    app.include_router(version_routes.router)
    app.include_router(admin_routes.router)
    app.include_router(admin_models.router)
    install_docs(app)
    state = app.state.serving

    def engines() -> Iterator[tuple[dict[str, str], EngineClient]]:
        for served in table.loaded():
            for replica, stats in served.engine.replica_stats().items():
                yield {**_labels(served), "replica": replica}, stats

    def ready(model: str) -> bool:
        versions = table.models[model].versions.values()
        alive = all(v.engine.is_alive for v in versions if v.engine is not None)
        return alive and not state.admission.draining

    observability = install_observability(
        app,
        engines=engines,
        ready=ready,
        log_level=config.log_level,
        log_format=config.log_format,
        otlp_endpoint=config.otlp_endpoint,
        redact=keys.redact,
    )
    observability.registry.register(ModelTableCollector(table))
    table.on_loaded(lambda served, engine: observability.watch(engine, _labels(served)))
    return app
