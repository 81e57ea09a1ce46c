"""An engine built from a copy of a checkpoint that is deleted once the engine has loaded
it: picklable as ``partial(vanishing_engine, ...)``, so that an engine process builds it
there, and a front end that read the model's files itself would find none (as when a
registered version's files change after their verification, or are not on its machine)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from auto_glm.engine.client import EngineClient
from auto_glm.engine.config import EngineConfig
from auto_glm.fleet import LoadSettings

__all__ = ["vanishing_engine"]


def vanishing_engine(path: str, **engine_options) -> EngineClient:
    copy = Path(tempfile.mkdtemp(prefix="vanishing-")) / Path(path).name
    shutil.copytree(path, copy)
    try:
        settings = LoadSettings(device="cpu", dtype="float32")
        return settings.build(str(copy), EngineConfig(**engine_options))
    finally:
        shutil.rmtree(copy.parent)
