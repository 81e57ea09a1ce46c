"""The HTTP server: OpenAI-compatible endpoints on the engine, ``autoglm serve``.

Import the modules you need (``auto_glm.serving.app``, ``.service``, ``.config``): this
package does not load them eagerly, so ``autoglm --help`` stays fast.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ConfigError", "GLMService", "ServerConfig", "create_app", "load_config"]

_HOMES = {
    "ConfigError": "config",
    "ServerConfig": "config",
    "load_config": "config",
    "GLMService": "service",
    "create_app": "app",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'auto_glm.serving' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"auto_glm.serving.{_HOMES[name]}"), name)
