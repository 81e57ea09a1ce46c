"""``/admin/models``: the served models, their versions and traffic, for the admin key holder.

``PUT /admin/models/{name}/traffic`` loads and verifies every version it names before any
request moves (the call returns once they are ready), so weight 1.0 on a new version is a
hot swap, and a split with a ``rollback`` rule is a canary that is taken back on its own.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from auto_glm.fleet import ModelUnavailable, RollbackRule, Traffic, TrafficError, UnknownModel
from auto_glm.registry import RegistryError
from auto_glm.serving.admin_routes import require_admin
from auto_glm.serving.errors import ERROR_RESPONSES, APIError
from auto_glm.serving.state import get_state

__all__ = ["router"]

router = APIRouter(
    prefix="/admin/models",
    tags=["Admin"],
    dependencies=[Depends(require_admin)],
    responses=ERROR_RESPONSES,
)


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_error_rate: float | None = Field(None, ge=0, le=1, description="Errors / requests")
    max_p95_ttft_s: float | None = Field(None, gt=0, description="95th percentile TTFT")
    window_s: float = Field(
        60.0, gt=0, description="Seconds of outcomes the rule looks at, at most 600"
    )
    min_requests: int = Field(
        20, ge=1, strict=True, description="Requests in the window before it judges"
    )


class TrafficBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: dict[str, float] = Field(
        description="Version -> weight (normalised to shares); versions left out get none",
        min_length=1,
    )
    sticky: Literal["user", "tenant", "none"] = Field(
        "none", description="Keep each user (the request's user field) or tenant on one version"
    )
    policy: Literal["weighted", "least_loaded"] = Field(
        "weighted",
        description="least_loaded: every version with weight is a variant, and each request "
        "goes to the one with the shortest queue (then the least KV cache in use)",
    )
    stable: str | None = Field(
        None, description="The version a rollback returns to; default: the largest weight"
    )
    rollback: RollbackBody | None = Field(
        None, description="Take all traffic back to the stable version when a canary breaks it"
    )


@router.get("", summary="Served models, versions, traffic and rollbacks")
async def list_models(request: Request) -> list[dict]:
    return get_state(request).table.describe()


@router.put("/{name}/traffic", summary="Split a model's traffic; load versions first")
async def set_traffic(name: str, body: TrafficBody, request: Request) -> dict:
    table = get_state(request).table
    try:
        traffic = Traffic(
            body.weights,
            sticky=body.sticky,
            policy=body.policy,
            stable=body.stable or "",
            rollback=None if body.rollback is None else RollbackRule(**body.rollback.model_dump()),
        )
        if body.stable is not None and traffic.stable != body.stable:
            raise TrafficError(
                f"stable={body.stable!r} has no weight; give it a weight above 0 or leave "
                "stable out"
            )
        await table.set_traffic(name, traffic)
    except TrafficError as exc:
        raise APIError(400, str(exc), param="weights", code="invalid_traffic") from None
    except UnknownModel as exc:
        raise APIError(404, str(exc), code="model_not_found") from None
    except RegistryError as exc:
        raise APIError(404, str(exc), param="weights", code="version_not_found") from None
    except ModelUnavailable as exc:
        raise APIError(
            409,
            f"{exc}; traffic is unchanged. Check it with autoglm models verify {exc.ref}",
            code="version_not_loadable",
        ) from None
    [described] = [m for m in table.describe() if m["name"] == name]
    return described
