"""The HTTP server: OpenAI-compatible endpoints on the engine, ``autoglm serve``."""

from auto_glm.serving.app import create_app
from auto_glm.serving.cli import add_serve_command
from auto_glm.serving.config import ConfigError, ServerConfig, load_config
from auto_glm.serving.service import GLMService

__all__ = ["ConfigError", "GLMService", "ServerConfig", "add_serve_command", "create_app",
           "load_config"]
