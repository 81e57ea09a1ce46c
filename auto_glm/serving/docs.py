"""Swagger UI at ``/docs`` and ReDoc at ``/redoc``, with every asset served by this server.

FastAPI's own pages load their JavaScript and CSS from a CDN, so on a machine without
internet access they stay blank. Here the bundles come from the ``fastapi-offline`` package
(Swagger UI 5 and ReDoc 2, kept up to date there) and are served under ``/docs/assets``.
Create the app with ``docs_url=None, redoc_url=None`` and call :func:`install_docs`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["ASSETS_URL", "install_docs"]

ASSETS_URL = "/docs/assets"
_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")


def _assets_dir() -> Path:
    directory = Path(str(resources.files("fastapi_offline") / "static"))
    missing = [name for name in _ASSETS if not (directory / name).is_file()]
    if missing:
        raise RuntimeError(
            f"the API docs assets {', '.join(missing)} are missing from {directory}; "
            "reinstall them with: pip install --force-reinstall 'fastapi-offline>=1.7,<2'"
        )
    return directory


def install_docs(app: FastAPI) -> None:
    """Add ``/docs``, ``/redoc``, Swagger UI's OAuth2 redirect page and the assets to ``app``."""
    app.mount(ASSETS_URL, StaticFiles(directory=_assets_dir()), name="docs-assets")
    title = app.title
    redirect_url = app.swagger_ui_oauth2_redirect_url

    def local(request: Request, path: str) -> str:
        return f"{request.scope.get('root_path', '')}{path}"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=local(request, app.openapi_url),
            title=f"{title} - Swagger UI",
            swagger_js_url=local(request, f"{ASSETS_URL}/swagger-ui-bundle.js"),
            swagger_css_url=local(request, f"{ASSETS_URL}/swagger-ui.css"),
            swagger_favicon_url=local(request, f"{ASSETS_URL}/favicon.png"),
            oauth2_redirect_url=local(request, redirect_url) if redirect_url else None,
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    if redirect_url:

        @app.get(redirect_url, include_in_schema=False)
        async def swagger_ui_redirect() -> HTMLResponse:
            return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(
            openapi_url=local(request, app.openapi_url),
            title=f"{title} - ReDoc",
            redoc_js_url=local(request, f"{ASSETS_URL}/redoc.standalone.js"),
            redoc_favicon_url=local(request, f"{ASSETS_URL}/favicon.png"),
            with_google_fonts=False,
        )
