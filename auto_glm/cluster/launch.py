"""``autoglm serve --ray``: start (or join) Ray, deploy the application, wait for a signal.

Without ``ray_address`` a local Ray instance is started on this machine's cores. SIGTERM
or SIGINT drains before Serve shuts down: the ingress refuses new calls (503; ``/ready``
turns 503) while the calls it holds run to completion, for up to ``drain_timeout``
seconds; then the application is deleted and the command exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from auto_glm.serving.config import ServerConfig

__all__ = ["serve_on_ray"]

log = logging.getLogger("auto_glm.cluster")
APP_NAME = "autoglm"
_POLL_S = 0.1


def _drain(ingress, timeout: float) -> None:
    left = ingress.begin_drain.remote().result()
    log.info("draining: refusing new requests, %d in flight", left)
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        time.sleep(_POLL_S)
        left = ingress.in_flight.remote().result()
    if left:
        log.warning("drain_timeout (%g s) passed with %d request(s) in flight", timeout, left)
    log.info("drained; shutting Serve down")


def serve_on_ray(config: ServerConfig, has_tenants: bool) -> int:
    import ray
    from ray import serve

    from auto_glm.cluster.app import build_app

    if config.ray_address:
        ray.init(address=config.ray_address, log_to_driver=False)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, _: stop.set())
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build_app(config, has_tenants), name=APP_NAME, route_prefix="/")
        log.info(
            "serving on Ray at http://%s:%d (%s)",
            config.host,
            config.port,
            config.autoscale
            and f"autoscale {config.autoscale}"
            or f"{config.num_replicas} replica(s)",
        )
        stop.wait()
        _drain(serve.get_app_handle(APP_NAME), config.drain_timeout)
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0
