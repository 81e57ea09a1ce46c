"""GPU metrics through NVML: present per device when NVML answers, absent (no error) otherwise."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from auto_glm.observability.gpu import nvml_collector


class FakeNVMLError(Exception):
    pass


def _fake_nvml(devices: list[tuple[int, int, int]] | None) -> types.ModuleType:
    """A ``pynvml`` stand-in; ``devices`` = [(util %, used, total)], None = no driver."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = FakeNVMLError

    def init() -> None:
        if devices is None:
            raise FakeNVMLError("NVML Shared Library Not Found")

    def handle(index: int) -> int:
        if devices[index] is None:
            raise FakeNVMLError("GPU is lost")
        return index

    nvml.nvmlInit = init
    nvml.nvmlDeviceGetCount = lambda: len(devices)
    nvml.nvmlDeviceGetHandleByIndex = handle
    nvml.nvmlDeviceGetUtilizationRates = lambda h: SimpleNamespace(gpu=devices[h][0], memory=0)
    nvml.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(
        used=devices[h][1], total=devices[h][2], free=0
    )
    return nvml


def _scrape(collector) -> dict:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (s.name, s.labels["gpu"]): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_each_device_is_reported_and_a_lost_one_is_skipped(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml([(50, 10, 80), None, (100, 1, 2)]))
    values = _scrape(nvml_collector())
    assert values == {
        ("autoglm:gpu_utilization_perc", "0"): 0.5,
        ("autoglm:gpu_memory_used_bytes", "0"): 10,
        ("autoglm:gpu_memory_total_bytes", "0"): 80,
        ("autoglm:gpu_utilization_perc", "2"): 1.0,
        ("autoglm:gpu_memory_used_bytes", "2"): 1,
        ("autoglm:gpu_memory_total_bytes", "2"): 2,
    }


def test_no_driver_no_device_or_no_package_means_no_collector(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(None))
    assert nvml_collector() is None
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml([]))
    assert nvml_collector() is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as if not installed
    assert nvml_collector() is None
