"""The design documents' own endpoints (``/generate``, ``/infer``) and the health probes."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from auto_glm.observability.exchange import exchange_of
from auto_glm.serving.errors import ERROR_RESPONSES, APIError
from auto_glm.serving.frontend import Frontend
from auto_glm.serving.openai_format import usage
from auto_glm.serving.protocol import GenerateRequest
from auto_glm.serving.responses import ErrorResponse, GenerateResponse, HealthResponse
from auto_glm.serving.state import caller, collect, get_state
from auto_glm.tenants import Tenant

__all__ = ["router"]

router = APIRouter()
_UNAVAILABLE = {503: {"model": ErrorResponse, "description": "Not available (see the message)"}}


async def _generate(
    body: GenerateRequest,
    request: Request,
    response: Response,
    tenant: Tenant | None = Depends(caller),
) -> GenerateResponse:
    call = await Frontend(get_state(request)).generate(body, tenant, exchange_of(request))
    generation = call.generation
    response.headers.update(call.metadata)
    [output] = await collect(generation, request)
    return GenerateResponse(
        result=output.outputs.text,
        finish_reason=output.outputs.finish_reason,
        usage=usage([output], 1),
    )


_DOC = (
    "Generate a continuation of `prompt` (text or token ids), like the Python API's "
    "`GLMModel.generate`; the text is in `result`."
)
router.add_api_route(
    "/generate",
    _generate,
    methods=["POST"],
    response_model=GenerateResponse,
    responses=ERROR_RESPONSES,
    summary="Generate",
    description=_DOC,
    tags=["Native"],
)
router.add_api_route(
    "/infer",
    _generate,
    methods=["POST"],
    response_model=GenerateResponse,
    responses=ERROR_RESPONSES,
    summary="Infer (same as /generate)",
    description=_DOC,
    tags=["Native"],
)


@router.get("/health", response_model=HealthResponse, responses=_UNAVAILABLE, tags=["Probes"])
async def health(request: Request) -> HealthResponse:
    """Liveness: 200 while every loaded engine's loop runs, 503 once one has died (restart
    the server)."""
    if not get_state(request).table.all_alive:
        raise APIError(503, "an engine loop has stopped; restart the server", code="engine_dead")
    return HealthResponse(status="ok")


@router.get("/ready", response_model=HealthResponse, responses=_UNAVAILABLE, tags=["Probes"])
async def ready(request: Request) -> HealthResponse:
    """Readiness: 200 when the models are loaded (or unloaded for idleness, to be loaded on
    demand) and the server takes requests; 503 while draining for shutdown or when an engine
    has died."""
    state = get_state(request)
    if state.admission.draining:
        raise APIError(503, "the server is draining for shutdown", code="draining")
    if not state.table.all_alive:
        raise APIError(503, "an engine loop has stopped; restart the server", code="engine_dead")
    return HealthResponse(status="ready")
