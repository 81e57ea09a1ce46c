"""Scrape-time metrics: the engine's own state and counters, read when Prometheus asks.

The engine keeps cumulative counters (``EngineClient.stats()``); reading them at scrape time
costs nothing per step and cannot drift from the engine's truth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from auto_glm.engine.client import EngineClient
from auto_glm.observability.metrics import BASE_LABELS

__all__ = ["EngineStatsCollector"]


Engines = Callable[[], Iterable[tuple[dict[str, str], EngineClient]]]


class EngineStatsCollector(Collector):
    """One series per loaded engine, labelled with its model and version; ``ready(model)``
    says whether the server takes requests for that model."""

    def __init__(self, engines: Engines, ready: Callable[[str], bool]) -> None:
        self._engines = engines
        self._names = list(BASE_LABELS)
        self._ready = ready

    def collect(self) -> Iterator[Metric]:
        engines = [
            ([labels[name] for name in BASE_LABELS], engine.stats())
            for labels, engine in self._engines()
        ]

        def family(kind, name: str, doc: str, value) -> Metric:
            metric = kind(f"autoglm:{name}", doc, labels=self._names)
            for values, stats in engines:
                metric.add_metric(values, value(stats))
            return metric

        gauge, counter = GaugeMetricFamily, CounterMetricFamily
        ready = GaugeMetricFamily(
            "autoglm:ready",
            "1 when the server accepts requests for the model, 0 when it is starting, "
            "draining or its engine died",
            labels=self._names,
        )
        for values, _ in engines:
            ready.add_metric(values, 1.0 if self._ready(values[0]) else 0.0)
        yield ready
        yield family(
            gauge, "num_requests_running", "Requests in the running batch", lambda s: s.num_running
        )
        yield family(
            gauge,
            "num_requests_waiting",
            "Requests queued for admission (new or preempted)",
            lambda s: s.num_waiting,
        )
        yield family(
            gauge,
            "kv_cache_usage_perc",
            "Fraction of KV cache blocks in use (0-1)",
            lambda s: s.kv_usage,
        )
        yield family(
            counter,
            "num_preemptions",
            "Requests preempted to free KV cache",
            lambda s: s.num_preemptions,
        )
        yield family(
            counter,
            "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            lambda s: s.prefix_cache_queries,
        )
        yield family(
            counter,
            "prefix_cache_hits",
            "Prompt tokens found in the prefix cache",
            lambda s: s.prefix_cache_hits,
        )
        yield family(
            counter,
            "engine_steps",
            "Engine steps (schedule + forward + sample)",
            lambda s: s.num_steps,
        )
        yield family(
            counter,
            "engine_steps_planned_ahead",
            "Engine steps planned and launched while the step before still ran on the device, "
            "before its tokens were read back (on a GPU)",
            lambda s: s.num_steps_ahead,
        )
        yield family(
            counter,
            "engine_failed_steps",
            "Engine steps the model runner failed; their requests ran again one at a time, "
            "and one that failed alone ended with an error",
            lambda s: s.num_failed_steps,
        )
        yield family(
            counter, "engine_step_seconds", "Time spent in engine steps", lambda s: s.step_time
        )
        yield family(
            counter,
            "engine_model_seconds",
            "Part of the step time spent in the model "
            "runner (input preparation, forward pass, sampling)",
            lambda s: s.model_time,
        )
