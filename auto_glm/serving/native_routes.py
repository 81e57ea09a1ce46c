"""The design documents' own endpoints (``/generate``, ``/infer``) and the health probes."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, Request, Response

from auto_glm.observability import request_tags
from auto_glm.sampling_params import SamplingParams
from auto_glm.serving.errors import ERROR_RESPONSES, APIError
from auto_glm.serving.openai_format import usage
from auto_glm.serving.protocol import GenerateRequest
from auto_glm.serving.responses import ErrorResponse, GenerateResponse, HealthResponse
from auto_glm.serving.state import caller, collect, get_state, until_admitted
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
    state = get_state(request)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    try:
        params = SamplingParams(
            max_tokens=body.max_new_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            stop=stop,
            seed=body.seed,
        )
    except ValueError as exc:
        raise APIError(400, str(exc), code="invalid_value") from exc
    lease = await state.route(body.model, tenant, request)
    with until_admitted(lease):
        [prompt] = await state.preprocessor.prompts(lease.client, [body.prompt], "prompt")
        generation = state.admission.start(
            lease,
            f"gen-{uuid.uuid4().hex}",
            [(prompt, params)],
            request_tags(request),
            tenant=tenant,
            priority=state.tenancy.priority(tenant, body.priority),
            stream=False,
        )
    response.headers.update(state.headers(tenant, lease))
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
