"""The values the model registry hands out, and the rules for names, versions and refs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from auto_glm.registry.errors import RegistryError
from auto_glm.registry.manifest import Manifest

__all__ = ["ModelVersion", "check_name", "parse_ref", "split_ref"]

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def check_name(kind: str, value: str) -> str:
    """Return ``value`` if it is a valid model ``kind`` ("name" or "version"), else refuse."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value in (".", ".."):
        raise RegistryError(
            f"invalid model {kind} {value!r}: use 1 to 64 characters from A-Z, a-z, 0-9, "
            "'.', '_' and '-' (but not '.' or '..')"
        )
    return value


def split_ref(ref: str) -> tuple[str, str | None]:
    """``NAME@VERSION`` or ``NAME`` alone as (name, version or None), both checked."""
    name, at, version = ref.partition("@")
    if not at:
        return check_name("name", name), None
    return check_name("name", name), check_name("version", version)


def parse_ref(ref: str) -> tuple[str, str]:
    """``NAME@VERSION`` as (name, version); a ref without a version is refused."""
    name, version = split_ref(ref)
    if version is None:
        raise RegistryError(
            f"{ref!r} names no version: write NAME@VERSION, e.g. {ref}@1 "
            f"(`autoglm models show {ref}` lists its versions)"
        )
    return name, version


@dataclass(frozen=True)
class ModelVersion:
    """One registered version of a model: where its files are, and what they must be.

    ``copied``: the registry copied the files into its own directory (and removes them with
    the version); ``signature``: the Sigstore bundle JSON, or None if unsigned; ``signer``:
    the SHA-256 fingerprint of the public key that signed it.
    """

    name: str
    version: str
    path: Path
    source: str
    copied: bool
    architecture: str | None
    dtype: str | None
    manifest: Manifest
    signature: str | None
    signer: str | None
    total_bytes: int
    created_at: datetime

    @property
    def ref(self) -> str:
        """``NAME@VERSION``."""
        return f"{self.name}@{self.version}"
