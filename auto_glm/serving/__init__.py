"""The HTTP server: OpenAI-compatible endpoints on the engine, ``autoglm serve``.

Import the modules you need (``auto_glm.serving.app``, ``.service``, ``.config``): this
package does not load them eagerly, so ``autoglm --help`` stays fast.
"""

from __future__ import annotations

from auto_glm.lazy import lazy_names

__all__ = ["ConfigError", "GLMService", "ServerConfig", "create_app", "load_config"]

_HOMES = {
    "ConfigError": "config",
    "ServerConfig": "config",
    "load_config": "config",
    "GLMService": "service",
    "create_app": "app",
}


__getattr__ = lazy_names("auto_glm.serving", _HOMES)
