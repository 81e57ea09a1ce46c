"""A model version's manifest: every file with its SHA-256 and size, and what the model is.

The architecture is ``architectures[0]`` of config.json; the dtype is config.json's
``torch_dtype`` (or ``dtype``), else the most common tensor dtype in the safetensors
headers. Links and special files are refused, so a manifest covers exactly the bytes that
a loader reads from the directory.
"""

from __future__ import annotations

import json
import re
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from auto_glm.registry.errors import RegistryError
from auto_glm.registry.hashing import Progress, hash_files, scan_directory

__all__ = ["FileEntry", "Manifest", "build_manifest"]

_FORMAT = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_HEADER = 100 << 20  # a safetensors header is JSON; anything bigger is not one
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


@dataclass(frozen=True)
class FileEntry:
    """One file: its path relative to the model directory (POSIX form), digest and size."""

    path: str
    sha256: str
    size: int

    def __post_init__(self) -> None:
        pure = PurePosixPath(self.path)
        if (
            not self.path
            or pure.is_absolute()
            or "\\" in self.path
            or pure.as_posix() != self.path
            or any(part in ("", ".", "..") for part in self.path.split("/"))
        ):
            raise RegistryError(
                f"manifest path {self.path!r} is invalid: paths are relative to the model "
                "directory, in POSIX form, inside it (no '..'); register the version again"
            )
        if not _SHA256.fullmatch(self.sha256) or isinstance(self.size, bool) or self.size < 0:
            raise RegistryError(
                f"manifest entry for {self.path!r} is invalid (sha256 {self.sha256!r}, size "
                f"{self.size!r}); register the version again"
            )


@dataclass(frozen=True)
class Manifest:
    """Every regular file of a model directory, sorted by path, and what the model is."""

    files: tuple[FileEntry, ...]
    architecture: str | None
    dtype: str | None
    source: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", tuple(sorted(self.files, key=lambda f: f.path)))
        paths = [entry.path for entry in self.files]
        if len(set(paths)) != len(paths):
            raise RegistryError("manifest lists a file twice; register the version again")

    @property
    def total_bytes(self) -> int:
        """The size of all the files together."""
        return sum(entry.size for entry in self.files)

    def digests(self) -> dict[str, str]:
        """Path: SHA-256 hex digest, for every file."""
        return {entry.path: entry.sha256 for entry in self.files}

    def to_json(self) -> str:
        """The manifest as one line of JSON (what the registry stores)."""
        return json.dumps(
            {
                "format": _FORMAT,
                "source": self.source,
                "architecture": self.architecture,
                "dtype": self.dtype,
                "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in self.files],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse :meth:`to_json`'s output, checking every entry."""
        try:
            data = json.loads(text)
            if data.get("format") != _FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {_FORMAT}")
            files = tuple(FileEntry(f["path"], f["sha256"], f["size"]) for f in data["files"])
            return cls(files, data["architecture"], data["dtype"], data["source"])
        except RegistryError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise RegistryError(
                f"stored manifest is not readable ({error!r}); it was written by another "
                "version of autoglm or changed by hand: register the version again"
            ) from None


def _safetensors_dtype(directory: Path, paths: list[str]) -> str | None:
    counts: Counter[str] = Counter()
    for path in paths:
        try:
            with open(directory / path, "rb") as file:
                (length,) = struct.unpack("<Q", file.read(8))
                if length > _MAX_HEADER:
                    continue
                header: dict[str, Any] = json.loads(file.read(length))
        except (OSError, struct.error, ValueError):
            continue
        for name, tensor in header.items():
            if name != "__metadata__" and isinstance(tensor, dict):
                code = str(tensor.get("dtype"))
                counts[_SAFETENSORS_DTYPES.get(code, code.lower())] += 1
    return counts.most_common(1)[0][0] if counts else None


def _model_info(directory: Path, files: dict[str, int]) -> tuple[str | None, str | None]:
    if "config.json" not in files:
        raise RegistryError(
            f"{directory} has no config.json: give the directory of a Hugging Face checkpoint "
            "(the one holding config.json, the weights and the tokenizer)"
        )
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RegistryError(
            f"{directory / 'config.json'} is not valid JSON ({error}); fix or replace it"
        ) from None
    if not isinstance(config, dict):
        raise RegistryError(f"{directory / 'config.json'} is not a JSON object; fix or replace it")
    architectures = config.get("architectures")
    architecture = None
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        architecture = architectures[0]
    dtype = config.get("torch_dtype") or config.get("dtype")
    if not isinstance(dtype, str) or dtype == "auto":
        weights = [path for path in files if path.endswith(".safetensors")]
        dtype = _safetensors_dtype(directory, weights)
    return architecture, dtype


def build_manifest(
    directory: str | Path,
    source: str,
    *,
    workers: int | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Hash every file of the model in ``directory``; ``source`` is where it came from.

    Refuses a directory without config.json, and one holding a link or a special file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise RegistryError(
            f"{directory} is not a directory: give the model's directory (the one holding "
            "config.json)"
        )
    scan = scan_directory(directory)
    if scan.refused:
        raise RegistryError(f"{directory} cannot be registered: " + "; ".join(scan.refused))
    architecture, dtype = _model_info(directory, scan.files)
    hashed, unreadable = hash_files(directory, scan.files, workers=workers, progress=progress)
    if unreadable:
        reasons = "; ".join(f"'{path}': {reason}" for path, reason in unreadable.items())
        raise RegistryError(
            f"cannot read files of {directory} ({reasons}); check their permissions"
        )
    files = tuple(FileEntry(path, *hashed[path]) for path in scan.files)
    return Manifest(files, architecture, dtype, source)
