"""What routing and traffic changes refuse, independent of the transport that reports it."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ModelUnavailable", "UnknownModel"]


class UnknownModel(LookupError):
    """The request names a model (or version) that this server does not serve."""

    def __init__(self, name: str, served: Sequence[str], message: str | None = None) -> None:
        self.name = name
        self.served = list(served)
        super().__init__(
            message
            or f"model {name!r} is not served here; this server serves "
            f"{', '.join(map(repr, served))} (see GET /v1/models)"
        )


class ModelUnavailable(RuntimeError):
    """The version a request was routed to could not be loaded."""

    def __init__(self, ref: str, reason: str) -> None:
        self.ref = ref
        self.reason = reason
        super().__init__(f"{ref} could not be loaded: {reason}")
