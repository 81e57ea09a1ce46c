"""``GLMService(model).run()``: serve a loaded model over HTTP until SIGTERM or SIGINT.

Shutdown drains instead of dropping work: on the first signal ``/ready`` turns 503 and new
requests get 503 while accepted ones run to completion (for up to ``drain_timeout``
seconds; whatever is left then ends with an explicit error). Only then does uvicorn stop
listening, and ``run`` returns normally, so the process exits 0. A second signal cuts the
drain short.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from auto_glm.api import GLMModel
from auto_glm.fleet import ModelTable
from auto_glm.serving.admission import Admission
from auto_glm.serving.app import create_app
from auto_glm.serving.config import ServerConfig
from auto_glm.serving.startup import log_startup_summary

if TYPE_CHECKING:
    from auto_glm.rpc.server import GrpcServer

__all__ = ["GLMService"]

log = logging.getLogger("auto_glm.serving")
_POLL_S = 0.05
_FLUSH_S = 2.0  # after the drain timeout: time for the error events to reach the clients


class _DrainingServer(uvicorn.Server):
    """uvicorn that turns its exit signals into a drain and stops once it is done.

    ``on_started`` runs once the server listens (it writes the start-up summary line).
    """

    def __init__(
        self,
        config: uvicorn.Config,
        admission: Admission,
        drain_timeout: float,
        on_started: Callable[[], None],
        grpc: GrpcServer | None = None,
    ) -> None:
        super().__init__(config)
        self.admission = admission
        self.drain_timeout = drain_timeout
        self.on_started = on_started
        self.grpc = grpc

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)  # exits the process when it cannot listen
        if self.grpc is not None:
            await self.grpc.start()
        self.on_started()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not calling super(): it records the signal and re-raises it after shutdown, which
        # would turn a clean drain into exit status 143 (or a KeyboardInterrupt).
        name = signal.Signals(sig).name
        if self.admission.draining:
            log.warning(
                "%s again: ending %d in-flight request(s) now", name, self.admission.num_in_flight
            )
            self.admission.expire()
            self.should_exit = True
        else:
            log.info("%s: draining before shutdown", name)
            self.admission.begin_drain()

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        watcher = asyncio.create_task(self._end_after_drain())
        try:
            await super().serve(sockets)
        finally:
            watcher.cancel()
            if self.grpc is not None:  # drained with HTTP: nothing of its own is left
                await self.grpc.stop(grace=_FLUSH_S)

    async def _end_after_drain(self) -> None:
        # Polled, like uvicorn's own exit flag: signal handlers may only set plain attributes.
        admission = self.admission
        while not admission.draining:
            await asyncio.sleep(_POLL_S)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout
        while admission.num_in_flight and loop.time() < deadline and not self.should_exit:
            await asyncio.sleep(_POLL_S)
        if admission.num_in_flight:
            log.warning(
                "drain_timeout (%g s) passed: ending %d request(s) with an error",
                self.drain_timeout,
                admission.num_in_flight,
            )
            admission.expire()
            flush_until = loop.time() + _FLUSH_S
            while admission.num_in_flight and loop.time() < flush_until:
                await asyncio.sleep(_POLL_S)
        log.info("drained; shutting down")
        self.should_exit = True


def _warn_unused_engine_settings(config: ServerConfig, model: GLMModel | None) -> None:
    # The engine exists before the service; its limits come from GLMModel(...), so engine
    # settings given only to the service would silently not apply.
    if model is None:
        return
    if config.engine_process:
        log.warning(
            "engine_process is ignored: the model's engine is already built in this process; "
            "serve it with `autoglm serve --engine-process` instead"
        )
    built = model.engine.config
    ignored = [
        f"{k}={v!r}"
        for k, v in config.engine_options().items()
        if k in config.model_fields_set
        and v != getattr(built, k)
        and not (k == "queue_policy" and config.queue_policy == "auto")  # resolved at start
    ]
    if ignored:
        log.warning(
            "engine settings %s are ignored: the model's engine is already built; pass "
            "them to GLMModel(...) instead",
            ", ".join(ignored),
        )


class GLMService:
    """An HTTP server for ``model``, or for the models of ``table`` (OpenAI-compatible, plus
    ``/generate``, ``/admin`` and probes).

    ``host``/``port`` override ``config``, whose defaults are 127.0.0.1:8080: only this
    machine can connect until ``host="0.0.0.0"`` (every interface) is passed explicitly.
    Every engine is shut down when :meth:`run` returns.
    """

    def __init__(
        self,
        model: GLMModel | None = None,
        host: str | None = None,
        port: int | None = None,
        config: ServerConfig | None = None,
        *,
        table: ModelTable | None = None,
    ) -> None:
        if (model is None) == (table is None):
            raise ValueError("GLMService needs a model or a table of models, not both")
        updates = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
        base = config or ServerConfig()
        self.config = ServerConfig.model_validate({**base.model_dump(), **updates})
        self.model = model
        self.app = create_app(model.engine if model is not None else table, self.config)
        self.table: ModelTable = self.app.state.serving.table
        _warn_unused_engine_settings(self.config, model)

    @property
    def admission(self) -> Admission:
        return self.app.state.serving.admission

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT and a completed drain; blocks the calling thread."""
        try:
            self._server().run()  # uvicorn's own event loop set-up (uvloop when installed)
        finally:
            self.table.close()

    async def serve(self) -> None:
        """Serve on the running event loop (signals are handled only in the main thread)."""
        await self._server().serve()

    def _server(self) -> _DrainingServer:
        config = uvicorn.Config(
            self.app,
            host=self.config.host,
            port=self.config.port,
            log_level=self.config.log_level,
            timeout_graceful_shutdown=5,
            log_config=None,
            access_log=False,
        )
        state = self.app.state.serving
        grpc = None
        if self.config.grpc_port is not None:
            from auto_glm.rpc.server import GrpcServer  # grpcio is loaded only when used

            grpc = GrpcServer(self.app, self.config)
        return _DrainingServer(
            config,
            self.admission,
            self.config.drain_timeout,
            on_started=lambda: log_startup_summary(state.table, self.config),
            grpc=grpc,
        )
