"""The Ray Serve application: an ingress deployment in front of engine replicas.

* ``ingress`` runs the whole FastAPI app of a single server (OpenAI and native routes,
  auth, admission, metrics) on a :class:`RemoteEngineClient`, so every rule is the same.
* ``engine`` runs one engine per replica (:class:`EngineReplica`), routed by prefix
  affinity (:class:`PrefixAffinityRouter`), health-checked, autoscaled on ongoing requests
  (which include the ones queued in the replica) and drained on shutdown.
* ``quotas`` (with more than one ingress replica) keeps the tenants' rate and daily
  budgets once for all of them (:class:`QuotaKeeper`).

:func:`build_app` makes it from a :class:`ServerConfig`; :func:`build` is the import path
for Serve config files and KubeRay (``auto_glm.cluster.app:build``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from auto_glm.cluster.quotas import KeptBook, QuotaKeeper
from auto_glm.cluster.remote import RemoteEngineClient
from auto_glm.cluster.replica import EngineReplica
from auto_glm.cluster.router import PrefixAffinityRouter
from auto_glm.fleet import ModelTable, ServeSpec
from auto_glm.serving.config import ServerConfig, load_config
from auto_glm.serving.table_setup import load_settings

__all__ = ["Ingress", "build", "build_app", "scaling"]


@serve.ingress()
class Ingress:
    async def __init__(
        self,
        engine: DeploymentHandle,
        config: ServerConfig,
        name: str,
        quotas: DeploymentHandle | None = None,
    ) -> None:
        from auto_glm.serving.app import create_app

        info = await engine.describe.remote()
        client = RemoteEngineClient(engine, info)
        version = info.get("version", "local")
        book = None if quotas is None else KeptBook(quotas)
        self.asgi = create_app(ModelTable.single(name, client, version), config, book)

    def __serve_build_asgi_app__(self):
        return self.asgi

    async def begin_drain(self) -> int:
        """Refuse new calls (503, /ready turns 503); returns the calls still in flight."""
        admission = self.asgi.state.serving.admission
        admission.begin_drain()
        return admission.num_in_flight

    async def in_flight(self) -> int:
        return self.asgi.state.serving.admission.num_in_flight


def scaling(config: ServerConfig) -> dict[str, Any]:
    """``num_replicas`` or ``autoscaling_config`` of the engine deployment."""
    if config.autoscale is None:
        return {"num_replicas": config.num_replicas}
    low, high = map(int, config.autoscale.split(","))
    return {
        "autoscaling_config": {
            "min_replicas": low,
            "max_replicas": high,
            "initial_replicas": max(low, 1),
            "target_ongoing_requests": config.autoscale_target_requests,
            "upscale_delay_s": config.upscale_delay_s,
            "downscale_delay_s": config.downscale_delay_s,
        }
    }


def build_app(config: ServerConfig, has_tenants: bool = False):
    """The application serving ``config``'s model (``--model`` or one ``--serve`` entry)."""
    settings = load_settings(config, has_tenants)
    spec: dict[str, Any] = {
        "settings": settings,
        "kv_cache_memory": int(config.kv_cache_memory) if config.kv_cache_memory else None,
        "database_url": config.database_url,
        "registry_dir": config.registry_dir,
        "model": config.model_name_or_path,
        "registered": None,
    }
    if config.serve:
        entry = ServeSpec.parse(config.serve[0])
        spec["registered"] = (entry.name, entry.version)
        name = entry.name
    else:
        from auto_glm.checkpoints import demo_model_path

        spec["model"] = spec["model"] or str(demo_model_path())
        name = config.served_model_name or Path(spec["model"]).name
    engine = serve.deployment(
        EngineReplica,
        name="engine",
        ray_actor_options={"num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus},
        # the engine batches and queues itself: admit what its batch and queue can hold
        max_ongoing_requests=config.max_num_seqs + config.max_queued_requests,
        health_check_period_s=2,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=config.drain_timeout,
        request_router_config=RequestRouterConfig(request_router_class=PrefixAffinityRouter),
        **scaling(config),
    )
    ingress = serve.deployment(
        Ingress,
        name="ingress",
        num_replicas=config.ingress_replicas,
        ray_actor_options={"num_cpus": config.ingress_cpus},
        max_ongoing_requests=10_000,  # admission control is the app's own (429, 503)
        graceful_shutdown_timeout_s=config.drain_timeout,
    )
    keeper = None
    if config.ingress_replicas > 1:
        keeper = serve.deployment(
            QuotaKeeper,
            name="quotas",
            num_replicas=1,
            ray_actor_options={"num_cpus": 0},
            max_ongoing_requests=10_000,  # each call is a few dict operations
        ).bind(config.database_url)
    return ingress.bind(engine.bind(spec), config, name, keeper)


def build(args: dict[str, Any]):
    """Serve's application builder: ``{"config": "config.yaml", "num_replicas": 2}`` or
    ``{"config": ..., "autoscale": "1,4"}``; other keys are settings too."""
    settings = {k: v for k, v in args.items() if k != "config"}
    return build_app(load_config(args.get("config"), {**settings, "ray": True}))
