"""How the model registry refuses: bad input, changed files, and signatures that do not hold."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["IntegrityError", "RegistryError", "SignatureError"]


class RegistryError(ValueError):
    """A request the registry cannot carry out; the message names the problem and the fix."""


class IntegrityError(RegistryError):
    """A model's files differ from its manifest; ``problems`` lists every difference."""

    def __init__(self, label: str, problems: Sequence[str]) -> None:
        self.label = label
        self.problems: tuple[str, ...] = tuple(problems)
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        super().__init__(
            f"{label} failed its integrity check ({count} {noun}): " + "; ".join(self.problems)
        )


class SignatureError(RegistryError):
    """A model version's signature is missing, untrusted, or does not match its manifest."""
