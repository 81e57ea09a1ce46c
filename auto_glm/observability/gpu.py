"""GPU utilization and memory per device through NVML, when there is a GPU to ask.

``pynvml`` (the nvidia-ml-py package) is optional: without it, without an NVIDIA driver or
without a device, :func:`nvml_collector` returns ``None`` and the metrics are simply absent.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import ModuleType

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["NvmlCollector", "nvml_collector"]

log = logging.getLogger("auto_glm.observability")


class NvmlCollector(Collector):
    """Per device, not per model: the models of one server share its GPUs."""

    def __init__(self, nvml: ModuleType, device_count: int) -> None:
        self._nvml = nvml
        self._count = device_count
        self._names = ["gpu"]

    def collect(self) -> Iterator[Metric]:
        util = GaugeMetricFamily(
            "autoglm:gpu_utilization_perc",
            "Fraction of the last sample period a kernel ran on the GPU (0-1)",
            labels=self._names,
        )
        used = GaugeMetricFamily(
            "autoglm:gpu_memory_used_bytes", "GPU memory in use, all processes", labels=self._names
        )
        total = GaugeMetricFamily(
            "autoglm:gpu_memory_total_bytes", "GPU memory installed", labels=self._names
        )
        for index in range(self._count):
            try:
                handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
                rates = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            except self._nvml.NVMLError as exc:  # a device that fell off the bus: skip, keep others
                log.warning("NVML could not read GPU %d: %s", index, exc)
                continue
            values = [str(index)]
            util.add_metric(values, rates.gpu / 100.0)
            used.add_metric(values, float(memory.used))
            total.add_metric(values, float(memory.total))
        yield from (util, used, total)


def nvml_collector() -> NvmlCollector | None:
    """A collector for every NVIDIA GPU of this machine, or ``None`` when there is none."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()  # left initialised: the collector reads it for the process's life
        count = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError as exc:  # no driver (a CPU machine) is the common case
        log.debug("NVML unavailable, no GPU metrics: %s", exc)
        return None
    return NvmlCollector(pynvml, count) if count else None
