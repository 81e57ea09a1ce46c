"""Scrape-time metrics of the model table: traffic weights, loaded versions, rollbacks."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from auto_glm.fleet.table import ModelTable
from auto_glm.fleet.version import VersionState

__all__ = ["ModelTableCollector"]

_LABELS = ["model", "version"]


class ModelTableCollector(Collector):
    def __init__(self, table: ModelTable) -> None:
        self._table = table

    def collect(self) -> Iterator[Metric]:
        weight = GaugeMetricFamily(
            "autoglm:model_traffic_weight",
            "Share of the model's requests routed to the version (0-1)",
            labels=_LABELS,
        )
        loaded = GaugeMetricFamily(
            "autoglm:model_loaded",
            "1 while the version's engine is loaded, 0 when it is not (idle or retired)",
            labels=_LABELS,
        )
        in_flight = GaugeMetricFamily(
            "autoglm:model_requests_in_flight",
            "API calls routed to the version and not yet finished",
            labels=_LABELS,
        )
        rollbacks = CounterMetricFamily(
            "autoglm:model_rollbacks",
            "Automatic rollbacks of the version as a canary",
            labels=_LABELS,
        )
        for model in self._table.models.values():
            for version, served in model.versions.items():
                labels = [model.name, version]
                weight.add_metric(labels, model.weight(version))
                loaded.add_metric(labels, float(served.state is VersionState.READY))
                in_flight.add_metric(labels, served.in_flight)
                rollbacks.add_metric(labels, model.rollback_counts[version])
        yield from (weight, loaded, in_flight, rollbacks)
