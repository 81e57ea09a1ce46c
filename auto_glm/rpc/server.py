"""The gRPC server beside the HTTP one: same process, same event loop, same engines.

``autoglm serve --grpc-port 50051`` serves ``autoglm.v1.Inference``, the standard
``grpc.health.v1.Health`` (SERVING while the server takes requests, NOT_SERVING once it
drains or an engine died) and server reflection, on the HTTP server's host. TLS is on when
``grpc_tls_cert`` and ``grpc_tls_key`` name PEM files; ``grpc_max_message_bytes`` bounds
every message. On SIGTERM the service drains HTTP and gRPC calls together, then stops both.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
from fastapi import FastAPI
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from auto_glm.rpc.decoding import TolerantDecoding
from auto_glm.rpc.servicer import SERVICE, InferenceServicer
from auto_glm.rpc.v1 import inference_pb2 as pb
from auto_glm.rpc.v1 import inference_pb2_grpc
from auto_glm.serving.config import ServerConfig

__all__ = ["GrpcServer"]

log = logging.getLogger("auto_glm.rpc")
_WATCH_S = 0.05
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _read(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(
            f"{setting}={path!r} cannot be read ({exc.strerror}); give a readable PEM file"
        ) from None


class GrpcServer:
    def __init__(self, app: FastAPI, config: ServerConfig) -> None:
        if config.grpc_port is None:
            raise ValueError("GrpcServer needs grpc_port")
        self.app = app
        self.state = app.state.serving
        host = f"[{config.host}]" if ":" in config.host else config.host
        self.address = f"{host}:{config.grpc_port}"
        self.credentials = None
        if config.grpc_tls_cert:
            key = _read(config.grpc_tls_key or "", "grpc_tls_key")
            cert = _read(config.grpc_tls_cert, "grpc_tls_cert")
            self.credentials = grpc.ssl_server_credentials([(key, cert)])
        size = int(config.grpc_max_message_bytes)
        self.options = [
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            ("grpc.so_reuseport", 0),  # a taken port must fail, not be shared
        ]
        self.health = HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen (on the running loop) and report SERVING; raises if the port is taken."""
        methods = pb.DESCRIPTOR.services_by_name["Inference"].methods
        decoding = TolerantDecoding(SERVICE, {m.name: m.input_type.full_name for m in methods})
        server = grpc.aio.server(options=self.options, interceptors=[decoding])
        inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(self.app), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
        reflection.enable_server_reflection((*names, reflection.SERVICE_NAME), server)
        if self.credentials is not None:
            port = server.add_secure_port(self.address, self.credentials)
        else:
            port = server.add_insecure_port(self.address)
        if not port:
            raise OSError(f"cannot listen for gRPC on {self.address}; choose another --grpc-port")
        await server.start()
        self._server = server
        await self._report(True)
        self._watcher = asyncio.get_running_loop().create_task(self._watch())
        log.info(
            "gRPC listening on %s (%s)", self.address, "TLS" if self.credentials else "plaintext"
        )

    def ready(self) -> bool:
        return not self.state.admission.draining and self.state.table.all_alive

    async def _report(self, serving: bool) -> None:
        status = _SERVING if serving else _NOT_SERVING
        for service in ("", SERVICE):
            await self.health.set(service, status)

    async def _watch(self) -> None:
        reported = True
        while True:
            await asyncio.sleep(_WATCH_S)
            ready = self.ready()
            if ready != reported:
                await self._report(ready)
                reported = ready

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING, then stop; calls still open after ``grace`` s are cancelled."""
        if self._watcher is not None:
            self._watcher.cancel()
        if self._server is not None:
            await self._report(False)
            await self._server.stop(grace)
            self._server = None
