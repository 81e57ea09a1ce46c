"""``GET /metrics`` of a live server: values follow the requests it served, not just names."""

from __future__ import annotations

import glob
import importlib.util
import json
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.observability.conftest import MODEL, LiveServer, eventually, sample, slow_steps

pytestmark = pytest.mark.integration


def _complete(server: LiveServer, prompt: str, max_tokens: int, **extra) -> dict:
    with server.client() as client:
        response = client.post(
            "/v1/completions",
            json={
                "model": MODEL,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "ignore_eos": True,
                **extra,
            },
        )
    assert response.status_code == 200, response.text
    return response.json()["usage"]


def _timed(call, *args) -> tuple[dict, float]:
    """``call(*args)`` and the seconds it took by the client's clock."""
    start = time.monotonic()
    result = call(*args)
    return result, time.monotonic() - start


def _stream_usage(server: LiveServer, prompt: str, max_tokens: int) -> dict:
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with server.client() as client, client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    return chunks[-1]["usage"]


def _buckets(metrics: dict, name: str) -> dict[float, float]:
    """Cumulative bucket counts of histogram ``name``: upper bound -> count."""
    return {
        float(dict(labels)["le"]): value
        for (sample_name, labels), value in metrics.items()
        if sample_name == f"{name}_bucket"
    }


def test_request_metrics_equal_what_the_api_served(start_server):
    server = start_server()
    # one at a time: each request's server-side times lie inside its client-side call
    calls = [_timed(_complete, server, f"the quick brown fox {i}", 4 + i) for i in range(3)]
    calls.append(_timed(_stream_usage, server, "jumps over the lazy dog", 6))
    usages = [usage for usage, _ in calls]
    client_seconds = [seconds for _, seconds in calls]
    served = len(usages)
    m = eventually(
        server, lambda m: sample(m, "autoglm:time_to_first_token_seconds_count") >= served
    )

    assert sample(m, "autoglm:time_to_first_token_seconds_count") == served
    assert sample(m, "autoglm:e2e_request_latency_seconds_count") == served
    assert sample(m, "autoglm:request_queue_time_seconds_count") == served
    assert sample(m, "autoglm:request_prefill_time_seconds_count") == served
    assert sample(m, "autoglm:inter_token_latency_seconds_count") == served  # all > 1 token
    assert sample(m, "autoglm:request_success_total", finish_reason="length") == served
    assert sample(m, "autoglm:request_failure_total") == 0
    prompt = sum(u["prompt_tokens"] for u in usages)
    generated = sum(u["completion_tokens"] for u in usages)
    assert generated == 4 + 5 + 6 + 6
    assert sample(m, "autoglm:prompt_tokens_total") == prompt
    assert sample(m, "autoglm:generation_tokens_total") == generated
    assert sample(m, "autoglm:request_prompt_tokens_sum") == prompt
    assert sample(m, "autoglm:request_generation_tokens_sum") == generated
    # latency values: bounded by the client's own clock, and the phases add up
    seconds = {
        key: sample(m, f"autoglm:{name}_sum")
        for key, name in (
            ("ttft", "time_to_first_token_seconds"),
            ("e2e", "e2e_request_latency_seconds"),
            ("queue", "request_queue_time_seconds"),
            ("prefill", "request_prefill_time_seconds"),
            ("decode", "request_decode_time_seconds"),
            ("itl", "inter_token_latency_seconds"),
        )
    }
    for key in ("ttft", "e2e", "queue", "prefill", "decode"):
        assert 0 <= seconds[key] <= sum(client_seconds), (key, seconds, client_seconds)
    # arrival -> first scheduled -> first token -> finish
    assert seconds["ttft"] == pytest.approx(seconds["queue"] + seconds["prefill"], abs=1e-6)
    assert seconds["e2e"] == pytest.approx(seconds["ttft"] + seconds["decode"], abs=1e-6)
    assert 0 < seconds["ttft"] < seconds["e2e"]
    # every model step ran inside one request's first-scheduled-to-finish span
    model_seconds = sample(m, "autoglm:engine_model_seconds_total")
    assert seconds["prefill"] + seconds["decode"] >= model_seconds > 0
    # ITL is decode time over (tokens - 1) per request: here 3 to 5 gaps each
    assert seconds["decode"] / 5 - 1e-6 <= seconds["itl"] <= seconds["decode"] / 3 + 1e-6
    # each observation sits in the buckets its value belongs to: none above the longest call
    longest = max(client_seconds)
    for name in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "request_prefill_time_seconds",
        "request_decode_time_seconds",
        "inter_token_latency_seconds",
    ):
        buckets = _buckets(m, f"autoglm:{name}")
        assert buckets[float("inf")] == served, name
        assert all(count == served for le, count in buckets.items() if le >= longest), (
            name,
            buckets,
            longest,
        )
    assert (
        sample(
            m, "autoglm:http_requests_total", method="POST", route="/v1/completions", status="200"
        )
        == served
    )
    assert (
        sample(
            m, "autoglm:http_request_duration_seconds_count", method="POST", route="/v1/completions"
        )
        == served
    )
    assert sample(m, "autoglm:num_requests_running") == 0
    assert sample(m, "autoglm:num_requests_waiting") == 0
    assert sample(m, "autoglm:kv_cache_usage_perc") == 0
    assert sample(m, "autoglm:ready") == 1
    assert sample(m, "autoglm:engine_steps_total") >= generated
    assert sample(m, "autoglm:engine_steps_planned_ahead_total") == 0  # only GPUs plan ahead
    assert (
        0
        < sample(m, "autoglm:engine_model_seconds_total")
        <= sample(m, "autoglm:engine_step_seconds_total")
    )


def test_errors_and_unknown_routes_are_counted_by_status(start_server):
    server = start_server()
    with server.client() as client:
        assert client.get("/no/such/page").status_code == 404
        bad = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "n": 0})
        assert 400 <= bad.status_code < 500
        assert client.get("/health").status_code == 200
    m = server.metrics()
    # requests that never reached a model (unrouted, refused before routing, probes) carry
    # empty model and version labels
    unrouted = {"model": "", "version": ""}
    assert (
        sample(
            m,
            "autoglm:http_requests_total",
            method="GET",
            route="unmatched",
            status="404",
            **unrouted,
        )
        == 1
    )
    assert (
        sample(
            m,
            "autoglm:http_requests_total",
            method="POST",
            route="/v1/completions",
            status=str(bad.status_code),
            **unrouted,
        )
        == 1
    )
    assert (
        sample(
            m,
            "autoglm:http_requests_total",
            method="GET",
            route="/health",
            status="200",
            **unrouted,
        )
        == 1
    )
    assert sample(m, "autoglm:time_to_first_token_seconds_count") == 0


def test_a_stream_is_counted_by_how_it_ended(start_server, monkeypatch):
    """A stream's 200 is sent with its first event: one its client closed was counted as
    200, and so was one that ended in a request_timeout error event."""
    server = start_server(config={"request_timeout": 1.0})
    slow_steps(server, monkeypatch, 0.05)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with server.client() as client:
        with client.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
        # the client left after the first event
        with client.stream("POST", "/v1/completions", json=body) as response:
            events = [line for line in response.iter_lines() if line.startswith("data: {")]
    assert json.loads(events[-1][6:])["error"]["code"] == "request_timeout"

    def counted(status: str):
        return lambda m: sample(
            m, "autoglm:http_requests_total", route="/v1/completions", status=status
        )

    m = eventually(server, lambda m: counted("499")(m) == 1 and counted("504")(m) == 1)
    assert (counted("499")(m), counted("504")(m), counted("200")(m)) == (1, 1, 0)


def test_prefix_cache_counters_equal_the_cached_tokens_reported(start_server):
    server = start_server()
    prompt = " ".join(f"word{i}" for i in range(60))  # several full KV blocks
    usages = [_complete(server, prompt, 2) for _ in range(2)]
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert cached > 0
    m = eventually(server, lambda m: sample(m, "autoglm:prompt_tokens_total") > 0)
    assert sample(m, "autoglm:prefix_cache_hits_total") == cached
    assert sample(m, "autoglm:prefix_cache_queries_total") == sum(
        u["prompt_tokens"] for u in usages
    )


def test_waiting_gauge_rises_when_the_queue_fills(start_server):
    server = start_server(max_num_seqs=1)
    count = 4
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(_complete, server, f"long request {i}", 120) for i in range(count)]
        busy = eventually(server, lambda m: sample(m, "autoglm:num_requests_waiting") >= 2)
        assert sample(busy, "autoglm:num_requests_running") == 1
        assert sample(busy, "autoglm:num_requests_waiting") >= 2
        assert 0 < sample(busy, "autoglm:kv_cache_usage_perc") <= 1
        for future in futures:
            future.result()
    m = eventually(server, lambda m: sample(m, "autoglm:request_queue_time_seconds_count") == count)
    assert sample(m, "autoglm:num_requests_waiting") == 0
    assert sample(m, "autoglm:num_requests_running") == 0
    assert sample(m, "autoglm:request_queue_time_seconds_count") == count
    # one at a time: the later ones queued behind at least one whole request
    assert sample(m, "autoglm:request_queue_time_seconds_sum") > 0.05


def test_refusals_are_counted_by_their_reason(start_server, monkeypatch):
    """A tenant's own limits are 429s too: the saturation alert reads queue_full only."""
    server = start_server(max_num_seqs=1, config={"max_queued_requests": 1})
    slow_steps(server, monkeypatch, 0.05)
    with ThreadPoolExecutor(2) as pool:
        futures = []
        for gauge in ("autoglm:num_requests_running", "autoglm:num_requests_waiting"):
            # one at a time: while the first waits for its slot, it fills the queue
            futures.append(pool.submit(_complete, server, f"long request {len(futures)}", 40))
            assert sample(eventually(server, lambda m, g=gauge: sample(m, g) >= 1), gauge) == 1
        with server.client() as client:
            body = {"model": MODEL, "prompt": "one too many", "max_tokens": 2}
            refused = client.post("/v1/completions", json=body)
        assert (refused.status_code, refused.json()["error"]["code"]) == (429, "queue_full")
        for future in futures:
            future.result()
    m = server.metrics()
    assert sample(m, "autoglm:requests_refused_total", reason="queue_full") == 1
    assert sample(m, "autoglm:requests_refused_total") == 1


def _driver_gpus() -> list[int]:
    """Memory in MiB of each NVIDIA GPU, as the driver reports it without our code:
    ``nvidia-smi``, or the device nodes when the tool is not installed."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return [0] * len(glob.glob("/dev/nvidia[0-9]*"))
    done = subprocess.run(
        [smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return [int(line) for line in done.stdout.split()] if done.returncode == 0 else []


def _gpu_series(server: LiveServer) -> dict[tuple[str, str], float]:
    return {
        (name, dict(labels)["gpu"]): value
        for (name, labels), value in server.metrics().items()
        if name.startswith("autoglm:gpu_")
    }


# NVML is read through nvidia-ml-py (the ``gpu`` extra); without it there are no GPU metrics
HAS_NVML = importlib.util.find_spec("pynvml") is not None


def test_gpu_metrics_are_absent_without_a_gpu(start_server):
    if HAS_NVML and _driver_gpus():
        pytest.skip("this machine has an NVIDIA GPU and nvidia-ml-py")
    assert _gpu_series(start_server()) == {}


@pytest.mark.skipif(not HAS_NVML, reason="needs nvidia-ml-py (pip install -e '.[gpu]')")
def test_gpu_metrics_report_every_gpu_the_driver_lists(start_server):
    memory = _driver_gpus()
    if not memory:
        pytest.skip("no NVIDIA GPU on this machine")
    series = _gpu_series(start_server())
    for name in ("utilization_perc", "memory_used_bytes", "memory_total_bytes"):
        assert {gpu for metric, gpu in series if metric == f"autoglm:gpu_{name}"} == {
            str(i) for i in range(len(memory))
        }
    for index, mib in enumerate(memory):
        gpu = str(index)
        total = series[("autoglm:gpu_memory_total_bytes", gpu)]
        if mib:  # from nvidia-smi, in MiB
            assert abs(total / 2**20 - mib) <= 1, (gpu, total, mib)
        assert 0 <= series[("autoglm:gpu_memory_used_bytes", gpu)] <= total
        assert 0 <= series[("autoglm:gpu_utilization_perc", gpu)] <= 1
