"""``GET /metrics`` of a live server: values follow the requests it served, not just names."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from auto_glm.observability.gpu import nvml_collector
from tests.observability.conftest import MODEL, LiveServer, sample

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


def _eventually(server: LiveServer, check, timeout: float = 10.0) -> dict:
    """Scrape until ``check(metrics)`` holds: the finish listener runs just after the
    engine hands a request's last output to its handler, so a scrape may beat it."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = server.metrics()
        if check(metrics) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.05)


def test_request_metrics_equal_what_the_api_served(start_server):
    server = start_server()
    usages = [_complete(server, f"the quick brown fox {i}", 4 + i) for i in range(3)]
    usages.append(_stream_usage(server, "jumps over the lazy dog", 6))
    served = len(usages)
    m = _eventually(
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
    # a request ends after its first token: TTFT never exceeds end-to-end latency in sum
    assert (
        0
        < sample(m, "autoglm:time_to_first_token_seconds_sum")
        < sample(m, "autoglm:e2e_request_latency_seconds_sum")
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
    assert (
        sample(m, "autoglm:http_requests_total", method="GET", route="unmatched", status="404") == 1
    )
    assert (
        sample(
            m,
            "autoglm:http_requests_total",
            method="POST",
            route="/v1/completions",
            status=str(bad.status_code),
        )
        == 1
    )
    assert (
        sample(m, "autoglm:http_requests_total", method="GET", route="/health", status="200") == 1
    )
    assert sample(m, "autoglm:time_to_first_token_seconds_count") == 0


def test_prefix_cache_counters_equal_the_cached_tokens_reported(start_server):
    server = start_server()
    prompt = " ".join(f"word{i}" for i in range(60))  # several full KV blocks
    usages = [_complete(server, prompt, 2) for _ in range(2)]
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert cached > 0
    m = _eventually(server, lambda m: sample(m, "autoglm:prompt_tokens_total") > 0)
    assert sample(m, "autoglm:prefix_cache_hits_total") == cached
    assert sample(m, "autoglm:prefix_cache_queries_total") == sum(
        u["prompt_tokens"] for u in usages
    )


def test_waiting_gauge_rises_when_the_queue_fills(start_server):
    server = start_server(max_num_seqs=1)
    count = 4
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(_complete, server, f"long request {i}", 120) for i in range(count)]
        busy = _eventually(server, lambda m: sample(m, "autoglm:num_requests_waiting") >= 2)
        assert sample(busy, "autoglm:num_requests_running") == 1
        assert sample(busy, "autoglm:num_requests_waiting") >= 2
        assert 0 < sample(busy, "autoglm:kv_cache_usage_perc") <= 1
        for future in futures:
            future.result()
    m = _eventually(
        server, lambda m: sample(m, "autoglm:request_queue_time_seconds_count") == count
    )
    assert sample(m, "autoglm:num_requests_waiting") == 0
    assert sample(m, "autoglm:num_requests_running") == 0
    assert sample(m, "autoglm:request_queue_time_seconds_count") == count
    # one at a time: the later ones queued behind at least one whole request
    assert sample(m, "autoglm:request_queue_time_seconds_sum") > 0.05


def test_gpu_metrics_are_absent_without_a_gpu(start_server):
    server = start_server()
    gpu_series = [name for name, _ in server.metrics() if name.startswith("autoglm:gpu_")]
    has_gpu = nvml_collector({"model": MODEL}) is not None
    assert bool(gpu_series) == has_gpu
