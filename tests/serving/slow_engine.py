"""An engine whose every step takes ``delay`` seconds more, built where it runs: picklable
as ``partial(slow_engine, ...)``, so that an engine process (``auto_glm.cluster.process``)
builds it there, where a test cannot reach the engine's internals."""

from __future__ import annotations

import time

from auto_glm.engine.client import EngineClient
from auto_glm.engine.config import EngineConfig
from auto_glm.fleet import LoadSettings

__all__ = ["slow_engine"]


def slow_engine(path: str, delay: float, **engine_options) -> EngineClient:
    engine = LoadSettings(device="cpu", dtype="float32").build(path, EngineConfig(**engine_options))
    runner = engine.core.runner
    execute = runner.execute

    def slowed(plan):
        time.sleep(delay)
        return execute(plan)

    runner.execute = slowed
    return engine
