"""Where a served version's engine comes from, and how it is (re)built.

A registered version is verified (every file re-hashed against its manifest, and its
signature checked) each time it is loaded: at start, at a swap, and at a reload after an
idle unload; it is loaded from the very files it hashed (:mod:`auto_glm.registry.pinning`).
A plain directory (``--model PATH``) loads as before, without a manifest; an engine built
by the caller (``GLMService(GLMModel(...))``) cannot be rebuilt, so it is never unloaded
for idleness.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from auto_glm.engine.client import EngineClient
from auto_glm.engine.config import EngineConfig
from auto_glm.engine.threads import on_own_thread
from auto_glm.loader import load_model

if TYPE_CHECKING:  # the registry is needed only for registered versions
    from auto_glm.registry import ModelRegistry, ModelVersion
    from auto_glm.registry.pinning import PinnedFiles

__all__ = [
    "EngineSource",
    "LoadSettings",
    "PathSource",
    "RegisteredSource",
    "VersionSource",
]

log = logging.getLogger("auto_glm.fleet")
_PROGRESS_STEP = 0.25  # log hashing progress every quarter


@dataclass(frozen=True)
class LoadSettings:
    """How every engine of the server is built."""

    device: str = "auto"
    dtype: str | None = None
    compute_dtype: str | None = None
    quantization: Literal["none", "int8", "w8a8"] = "none"
    engine_options: dict[str, Any] = field(default_factory=dict)
    signatures: Literal["off", "optional", "required"] = "optional"
    trusted_keys: tuple[Path, ...] = ()
    # each engine in a child process of its own (see auto_glm.cluster.process)
    engine_process: bool = False

    def engine_config(self, kv_cache_memory: int | None, kv_fraction: float) -> EngineConfig:
        options = dict(self.engine_options)
        if kv_cache_memory is not None:
            options["kv_cache_memory"] = kv_cache_memory
        elif options.get("kv_cache_memory") is None:
            options["kv_cache_fraction"] = kv_fraction
        return EngineConfig(**options)

    def build(
        self,
        path: Path | str,
        config: EngineConfig,
        pinned: PinnedFiles | None = None,
    ) -> EngineClient:
        """Load ``path`` and start its engine, on a thread that ends with the build (see
        :mod:`auto_glm.engine.threads`); with ``engine_process``, in a child process that
        does that, and the client of it here. A registered version loads from its
        ``pinned`` files, whose descriptors an engine process inherits and closes once
        built; the engine still names ``path``."""
        here = (
            partial(self.build_here, path, config)
            if pinned is None
            else partial(self.build_here, pinned.directory, config, Path(path))
        )
        if self.engine_process:
            from auto_glm.cluster.process import ProcessEngineClient

            fds = () if pinned is None else pinned.fds
            return ProcessEngineClient.start(partial(_build_closing, fds, here), str(path), fds)
        return here()

    def build_here(
        self, source: Path | str, config: EngineConfig, named: Path | None = None
    ) -> EngineClient:
        """Load ``source`` and start its engine in this process, on a thread that ends with
        the build; the engine names ``named`` instead when given (a registered version's
        directory, loaded from its pinned files)."""

        def build() -> EngineClient:
            loaded = load_model(
                str(source),
                device=self.device,
                dtype=self.dtype,
                compute_dtype=self.compute_dtype,
                quantization=self.quantization,
            )
            return EngineClient(loaded if named is None else replace(loaded, path=named), config)

        return on_own_thread(build)


class VersionSource(Protocol):
    version: str
    reloadable: bool

    def describe(self) -> dict[str, Any]: ...

    def load(self, ref: str, config: EngineConfig) -> EngineClient:
        """Build the engine (blocking; runs in a worker thread); ``ref`` names it in logs."""
        ...


class EngineSource:
    """An engine the caller already built; it is handed out once and never rebuilt."""

    reloadable = False

    def __init__(self, engine: EngineClient, version: str = "local") -> None:
        self.version = version
        self._engine: EngineClient | None = engine
        self.path = engine.loaded.path

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "registered": False, "signed": False}

    def load(self, ref: str, config: EngineConfig) -> EngineClient:
        if self._engine is None:
            raise RuntimeError(f"{ref} was built by the caller and cannot be loaded again")
        engine, self._engine = self._engine, None
        return engine


class PathSource:
    """A model directory or hub id that is not in the registry (``--model PATH``)."""

    reloadable = True

    def __init__(self, path: str, settings: LoadSettings, version: str = "local") -> None:
        self.path, self.settings, self.version = path, settings, version

    def describe(self) -> dict[str, Any]:
        return {"path": self.path, "registered": False, "signed": False}

    def load(self, ref: str, config: EngineConfig) -> EngineClient:
        return self.settings.build(self.path, config)


class RegisteredSource:
    """A version in the model registry: verified against its manifest at every load."""

    reloadable = True

    def __init__(self, registry: ModelRegistry, entry: ModelVersion, settings: LoadSettings):
        self.registry, self.entry, self.settings = registry, entry, settings
        self.version = entry.version

    def describe(self) -> dict[str, Any]:
        entry = self.entry
        return {
            "path": str(entry.path),
            "registered": True,
            "signed": entry.signature is not None,
            "architecture": entry.architecture,
            "dtype": entry.dtype,
            "bytes": entry.total_bytes,
        }

    def load(self, ref: str, config: EngineConfig) -> EngineClient:
        entry, settings = self.entry, self.settings
        files = len(entry.manifest.files)
        log.info(
            "verifying %s: %d files, %.1f MB against its manifest (signatures: %s)",
            ref,
            files,
            entry.total_bytes / 1e6,
            settings.signatures,
        )
        report = self.registry.verify(
            entry,
            signatures=settings.signatures,
            trusted_keys=settings.trusted_keys,
            progress=_progress_logger(ref),
            pin=True,
        )
        log.info(
            "verified %s: %d files, %.1f MB in %.2f s",
            ref,
            files,
            report.bytes / 1e6,
            report.seconds,
        )
        start = time.monotonic()
        log.info("loading %s from %s", ref, entry.path)
        with report.pinned as pinned:  # what is loaded is what was hashed
            engine = settings.build(entry.path, config, pinned)
            try:
                pinned.check_unchanged()
            except BaseException:
                engine.shutdown()
                raise
        log.info(
            "loaded %s in %.2f s: %d KV cache blocks",
            ref,
            time.monotonic() - start,
            engine.num_blocks,
        )
        return engine


def _build_closing(fds: tuple[int, ...], build: Callable[[], EngineClient]) -> EngineClient:
    """``build()`` in an engine process, then close the descriptors it inherited to load."""
    try:
        return build()
    finally:
        for fd in fds:
            os.close(fd)


def _progress_logger(ref: str):
    marks: list[float] = [_PROGRESS_STEP]

    def progress(done: int, total: int) -> None:
        if total and done / total >= marks[0] and done < total:
            log.info("verifying %s: %d%% hashed", ref, int(100 * done / total))
            while marks[0] <= done / total:
                marks[0] += _PROGRESS_STEP

    return progress
