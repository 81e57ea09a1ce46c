"""Scrape-time metrics: the engine's own state and counters, read when Prometheus asks.

The engine keeps cumulative counters (``EngineClient.stats()``); reading them at scrape time
costs nothing per step and cannot drift from the engine's truth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from auto_glm.engine.client import EngineClient
from auto_glm.observability.metrics import BASE_LABELS

__all__ = ["EngineStatsCollector"]


class EngineStatsCollector(Collector):
    def __init__(
        self, engine: EngineClient, labels: dict[str, str], ready: Callable[[], bool]
    ) -> None:
        self._engine = engine
        self._names = list(BASE_LABELS)
        self._values = [labels[name] for name in BASE_LABELS]
        self._ready = ready

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(f"autoglm:{name}", doc, labels=self._names)
        family.add_metric(self._values, value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(f"autoglm:{name}", doc, labels=self._names)
        family.add_metric(self._values, value)
        return family

    def collect(self) -> Iterator[Metric]:
        s = self._engine.stats()
        yield self._gauge(
            "ready",
            "1 when the server accepts requests, 0 when it is starting, "
            "draining or its engine died",
            1.0 if self._ready() else 0.0,
        )
        yield self._gauge("num_requests_running", "Requests in the running batch", s.num_running)
        yield self._gauge(
            "num_requests_waiting",
            "Requests queued for admission (new or preempted)",
            s.num_waiting,
        )
        yield self._gauge(
            "kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1)", s.kv_usage
        )
        yield self._counter(
            "num_preemptions", "Requests preempted to free KV cache", s.num_preemptions
        )
        yield self._counter(
            "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            s.prefix_cache_queries,
        )
        yield self._counter(
            "prefix_cache_hits", "Prompt tokens found in the prefix cache", s.prefix_cache_hits
        )
        yield self._counter(
            "engine_steps", "Engine steps (schedule + forward + sample)", s.num_steps
        )
        yield self._counter("engine_step_seconds", "Time spent in engine steps", s.step_time)
        yield self._counter(
            "engine_model_seconds",
            "Part of the step time spent in the model "
            "runner (input preparation, forward pass, sampling)",
            s.model_time,
        )
