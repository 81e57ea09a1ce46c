"""``GET /version``: the package version and what it runs on, for bug reports and fleets."""

from __future__ import annotations

from functools import cache

import torch
from fastapi import APIRouter
from pydantic import BaseModel, Field

from auto_glm.build_info import build_info

__all__ = ["VersionInfo", "router"]

router = APIRouter()


class VersionInfo(BaseModel):
    """Versions of this server and of the libraries it runs on (null: not installed)."""

    version: str = Field(description="Open-AutoGLM package version")
    python: str = Field(description="Python version")
    torch: str | None = Field(description="PyTorch version (with its build tag, e.g. +cpu)")
    torch_cuda: str | None = Field(
        description="CUDA version PyTorch was built with; null for a CPU-only build"
    )
    transformers: str | None = Field(description="transformers version")
    fastapi: str | None = Field(description="FastAPI version")
    pydantic: str | None = Field(description="pydantic version")
    uvicorn: str | None = Field(description="uvicorn version")


@cache
def _version_info() -> VersionInfo:
    return VersionInfo(**build_info(), torch_cuda=torch.version.cuda)


@router.get("/version", response_model=VersionInfo, tags=["Operations"])
async def version() -> VersionInfo:
    """Package and dependency versions; they cannot change while the server runs."""
    return _version_info()
