"""The one exception type the loader raises for a model it cannot use."""

from __future__ import annotations

__all__ = ["ModelLoadError"]


class ModelLoadError(ValueError):
    """A model could not be loaded; the message names the problem and how to fix it.

    A ``ValueError`` so callers that already treat bad arguments as ``ValueError``
    (the CLI, the HTTP server) report it without a special case.
    """
