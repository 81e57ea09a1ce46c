"""The values of the per-request metrics, checked against what the client itself measured.

The test server runs in this process and the engine stamps its times with
``time.monotonic()``, so the client's own clock readings bound the server's: a request
cannot arrive before it was sent, nor produce its first token after the client read it.
Engine steps are slowed by a known sleep (``slow_steps``) to give lower bounds that hold
on any machine; token counts are checked against the response's usage and the request's
own parameters, never against the metrics code.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from auto_glm.engine.output_processor import RequestOutputProcessor
from auto_glm.sampling_params import SamplingParams
from tests.observability.conftest import MODEL, LiveServer, eventually, sample, slow_steps
from tests.serving.conftest import EngineGate

pytestmark = pytest.mark.integration
EPS = 1e-6  # float sums of exact bounds
SUCCESS = "autoglm:request_success_total"
LATENCIES = ("queue", "ttft", "prefill", "decode", "itl", "e2e")
_HISTOGRAM = {
    "queue": "autoglm:request_queue_time_seconds",
    "ttft": "autoglm:time_to_first_token_seconds",
    "prefill": "autoglm:request_prefill_time_seconds",
    "decode": "autoglm:request_decode_time_seconds",
    "itl": "autoglm:inter_token_latency_seconds",
    "e2e": "autoglm:e2e_request_latency_seconds",
}


def _hist(metrics: dict, key: str) -> tuple[float, float]:
    """(count, sum) of one latency histogram."""
    name = _HISTOGRAM[key]
    return sample(metrics, f"{name}_count"), sample(metrics, f"{name}_sum")


def _body(max_tokens: int, prompt: str = "measure me", **extra) -> dict:
    return {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }


class TimedStream(threading.Thread):
    """A streamed completion with the client's clock readings: ``sent`` just before the
    request, ``first`` when the first event arrived, ``done`` when ``[DONE]`` arrived."""

    def __init__(self, server: LiveServer, body: dict) -> None:
        super().__init__(daemon=True)
        self.server, self.body = server, body
        self.sent = self.first = self.done = 0.0
        self.chunks: list[dict] = []

    def run(self) -> None:
        with self.server.client() as client:
            self.sent = time.monotonic()
            with client.stream("POST", "/v1/completions", json=self.body) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if not self.first:
                        self.first = time.monotonic()
                    if line == "data: [DONE]":
                        self.done = time.monotonic()
                    else:
                        self.chunks.append(json.loads(line[6:]))

    def result(self) -> TimedStream:
        self.join(60)
        assert self.done, "the stream did not end"
        return self

    @property
    def usage(self) -> dict:
        return self.chunks[-1]["usage"]

    @property
    def finish_reason(self) -> str:
        return [c["choices"][0]["finish_reason"] for c in self.chunks if c["choices"]][-1]


def _timed(server: LiveServer, body: dict) -> TimedStream:
    stream = TimedStream(server, body)
    stream.start()
    return stream.result()


def _until(condition, timeout: float = 10.0) -> float:
    """Wait for ``condition``; returns the clock reading just after it was seen to hold."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)
    return time.monotonic()


def test_ttft_and_queue_time_count_from_arrival(start_server, monkeypatch):
    """B waits for A's batch slot: its queue time and TTFT include that wait."""
    step = 0.02
    server = start_server(max_num_seqs=1)
    slow_steps(server, monkeypatch, step)
    engine = server.model.engine
    with server.client() as client:
        a_sent = time.monotonic()
        # 480 tokens at >= 20 ms a step: A holds the only slot until the client hangs up
        with client.stream("POST", "/v1/completions", json=_body(480)) as a:
            lines = a.iter_lines()  # kept: a dropped iterator would close the connection
            next(line for line in lines if line.startswith("data: {"))
            a_first = time.monotonic()
            b = TimedStream(server, _body(4, prompt="queued behind"))
            b.start()
            waiting_seen = _until(lambda: engine.stats().num_waiting == 1)  # B has arrived
            time.sleep(0.3)
            still_waiting = time.monotonic()
            stats = engine.stats()
            assert (stats.num_running, stats.num_waiting) == (1, 1), stats  # B not scheduled
            a_hung_up = time.monotonic()
        # leaving the block closes A's connection: the server aborts A, then B runs
    b.result()
    assert (b.finish_reason, b.usage["completion_tokens"]) == ("length", 4)
    m = eventually(
        server,
        lambda m: (
            sample(m, SUCCESS, finish_reason="abort") == 1
            and sample(m, SUCCESS, finish_reason="length") == 1
        ),
    )
    a_counted = time.monotonic()
    assert sample(m, SUCCESS, finish_reason="abort") == 1  # A: the client went away
    assert sample(m, SUCCESS, finish_reason="length") == 1  # B
    assert sample(m, "autoglm:request_failure_total") == 0

    b_waited = still_waiting - waiting_seen  # B arrived before, was scheduled after: >= 0.3 s
    # (lower, upper) bound of each request's value, from the client's clock
    bounds = {
        "queue": [(0, a_first - a_sent - step), (b_waited, b.first - b.sent - step)],
        "ttft": [(step, a_first - a_sent), (b_waited + step, b.first - b.sent)],
        "e2e": [(a_hung_up - a_first, a_counted - a_sent), (b_waited + 4 * step, b.done - b.sent)],
    }
    for key, per_request in bounds.items():
        count, total = _hist(m, key)
        assert count == 2, key
        low, high = sum(lo for lo, _ in per_request), sum(hi for _, hi in per_request)
        assert low - EPS <= total <= high + EPS, (key, low, total, high)


def test_inter_token_latency_is_the_mean_gap_between_tokens(start_server, monkeypatch):
    """ITL = (finish - first token) / (tokens - 1): one observation per request."""
    step = 0.1
    server = start_server()
    slow_steps(server, monkeypatch, step)
    for tokens in (2, 5, 1):
        before = server.metrics()
        stream = _timed(server, _body(tokens, prompt=f"{tokens} tokens"))
        assert stream.usage["completion_tokens"] == tokens
        done = _hist(before, "e2e")[0] + 1
        m = eventually(server, lambda m, done=done: _hist(m, "e2e")[0] == done)
        delta = {
            k: tuple(a - b for a, b in zip(_hist(m, k), _hist(before, k), strict=True))
            for k in LATENCIES
        }
        assert {k: count for k, (count, _) in delta.items()} == {
            "queue": 1,
            "ttft": 1,
            "prefill": 1,
            "decode": 1,
            "itl": 1 if tokens > 1 else 0,  # per request, not per gap; none for one token
            "e2e": 1,
        }
        value = {k: total for k, (_, total) in delta.items()}
        # each step sleeps `step` before its token: the first token comes >= 1 step after
        # scheduling, the last one >= tokens - 1 steps after the first
        first_to_last = stream.done - stream.sent - step  # bounds finish - first token
        assert step <= value["ttft"] <= stream.first - stream.sent
        assert step <= value["prefill"] <= stream.first - stream.sent
        assert 0 <= value["queue"] <= stream.first - stream.sent - step
        assert (tokens - 1) * step <= value["decode"] + EPS <= first_to_last + EPS
        assert tokens * step <= value["e2e"] <= stream.done - stream.sent
        if tokens > 1:
            assert step <= value["itl"] <= first_to_last / (tokens - 1)


def test_counters_are_exact_under_concurrent_load(start_server, monkeypatch):
    """Calls of every shape in the engine at once: counters add up to what was asked for."""
    server = start_server()
    chat = [{"role": "user", "content": "count"}]
    calls = [
        ("/v1/completions", {"prompt": "alpha beta", "max_tokens": 3, "n": 2}),
        ("/v1/completions", {"prompt": ["one", "two three", "four five six"], "max_tokens": 4}),
        ("/v1/completions", {"prompt": "streamed", "max_tokens": 5, "n": 3, "stream": True}),
        ("/v1/completions", {"prompt": [11, 12, 13, 14], "max_tokens": 7}),
        ("/v1/chat/completions", {"messages": chat, "max_tokens": 6, "n": 2}),
        ("/v1/chat/completions", {"messages": chat, "max_tokens": 2, "stream": True}),
    ] * 2
    for _, body in calls:
        body.update(model=MODEL, ignore_eos=True)
        if body.get("stream"):
            body["stream_options"] = {"include_usage": True}

    def prompts(body: dict) -> int:
        prompt = body.get("prompt")
        return len(prompt) if isinstance(prompt, list) and isinstance(prompt[0], str) else 1

    def call(path: str, body: dict) -> dict:
        with server.client() as client:
            if not body.get("stream"):
                response = client.post(path, json=body)
                assert response.status_code == 200, response.text
                return response.json()["usage"]
            with client.stream("POST", path, json=body) as response:
                assert response.status_code == 200
                events = [line[6:] for line in response.iter_lines() if line.startswith("data: {")]
            return json.loads(events[-1])["usage"]

    gate = EngineGate(server, monkeypatch)
    admission = server.app.state.serving.admission
    try:
        with ThreadPoolExecutor(len(calls)) as pool:
            futures = [pool.submit(call, path, body) for path, body in calls]
            assert gate.entered.wait(10)
            _until(lambda: len(admission.active) == len(calls))  # all in the engine at once
            gate.release()
            usages = [f.result() for f in futures]
    finally:
        gate.release()

    requests = sum(prompts(b) * b.get("n", 1) for _, b in calls)
    generated = sum(prompts(b) * b.get("n", 1) * b["max_tokens"] for _, b in calls)
    # usage counts each prompt once per call; the metrics count it once per engine request
    prompt_tokens = sum(
        u["prompt_tokens"] * b.get("n", 1) for u, (_, b) in zip(usages, calls, strict=True)
    )
    assert sum(u["completion_tokens"] for u in usages) == generated
    m = eventually(server, lambda m: sample(m, SUCCESS, finish_reason="length") >= requests)
    assert sample(m, SUCCESS, finish_reason="length") == requests
    assert sample(m, SUCCESS, finish_reason="stop") == 0
    assert sample(m, SUCCESS, finish_reason="abort") == 0
    assert sample(m, "autoglm:request_failure_total") == 0
    assert sample(m, "autoglm:generation_tokens_total") == generated
    assert sample(m, "autoglm:request_generation_tokens_sum") == generated
    assert sample(m, "autoglm:prompt_tokens_total") == prompt_tokens
    assert sample(m, "autoglm:request_prompt_tokens_sum") == prompt_tokens
    assert sample(m, "autoglm:request_prompt_tokens_count") == requests
    for key in LATENCIES:
        assert _hist(m, key)[0] == requests, key  # every request has more than one token
    for path in ("/v1/completions", "/v1/chat/completions"):
        sent = sum(p == path for p, _ in calls)
        labels = {"method": "POST", "route": path}
        assert sample(m, "autoglm:http_requests_total", status="200", **labels) == sent
        assert sample(m, "autoglm:http_request_duration_seconds_count", **labels) == sent
    assert sample(m, "autoglm:num_requests_running") == 0
    assert sample(m, "autoglm:num_requests_waiting") == 0


def test_a_stop_string_request_counts_the_tokens_the_client_got(start_server, monkeypatch):
    """The engine decodes on while the output thread finds the stop string; the metrics
    count what the client was given (its usage), not what the engine decoded."""
    server = start_server()
    prompt = "stop somewhere"
    tokenizer = server.model.tokenizer
    [greedy] = server.model.generate_batch(
        [prompt], SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    )
    ids = greedy.token_ids

    def text(count: int) -> str:
        return tokenizer.decode(
            ids[:count], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def new_text(count: int) -> str:
        return text(count)[len(text(count - 1)) :]

    # a stop string that first appears with token `cut`, so the client gets `cut` tokens
    # (plain ASCII: text ending in a split character is held back until the next token)
    cut, stop = next(
        (k, new_text(k))
        for k in range(6, 40)
        if len(new_text(k)) > 1 and new_text(k).isascii() and new_text(k) not in text(k - 1)
    )
    # a slow output thread: the engine is many tokens further when the stop is found
    process = RequestOutputProcessor.process

    def slow_process(self, *args, **kwargs):
        time.sleep(0.05)
        return process(self, *args, **kwargs)

    monkeypatch.setattr(RequestOutputProcessor, "process", slow_process)
    decoded: list[int] = []
    server.model.engine.add_finish_listener(
        lambda request, output, error: decoded.append(request.num_output_tokens)
    )
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": 64,
        "temperature": 0,
        "ignore_eos": True,
        "stop": [stop],
    }
    before = server.metrics()  # the greedy run above is counted too
    with server.client() as client:
        reply = client.post("/v1/completions", json=body).json()
    [choice] = reply["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == text(cut)[: text(cut).index(stop)]
    assert reply["usage"]["completion_tokens"] == cut
    m = eventually(server, lambda m: sample(m, SUCCESS, finish_reason="stop") == 1)
    assert decoded[0] > cut  # the race really happened: the engine decoded past the stop
    assert sample(m, SUCCESS, finish_reason="stop") == 1

    def added(name: str) -> float:
        return sample(m, name) - sample(before, name)

    assert added("autoglm:generation_tokens_total") == cut
    assert added("autoglm:request_generation_tokens_sum") == cut
    assert added("autoglm:request_generation_tokens_count") == 1


def test_cancelled_requests_are_counted_as_abort(start_server, monkeypatch):
    """A timeout, a client leaving a stream and one leaving a plain request: three aborts."""
    server = start_server(config={"request_timeout": 0.5})
    slow_steps(server, monkeypatch, 0.05)  # 200 tokens take >= 10 s: nothing ends on its own
    body = {"model": MODEL, "prompt": "never done", "max_tokens": 200, "ignore_eos": True}
    with server.client() as client:
        timed_out = client.post("/v1/completions", json=body)
        assert timed_out.status_code == 504
        assert timed_out.json()["error"]["code"] == "request_timeout"
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            next(line for line in r.iter_lines() if line.startswith("data: {"))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.2)
    m = eventually(server, lambda m: sample(m, SUCCESS, finish_reason="abort") >= 3)
    assert sample(m, SUCCESS, finish_reason="abort") == 3
    assert sample(m, SUCCESS, finish_reason="length") == 0
    assert sample(m, "autoglm:request_failure_total") == 0


def test_an_engine_failure_is_counted_as_a_failure(start_server, monkeypatch):
    server = start_server()

    def broken(plan):
        raise RuntimeError("simulated device fault")

    monkeypatch.setattr(server.model.engine.core.runner, "execute", broken)
    with server.client() as client:
        response = client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "fail me", "max_tokens": 4}
        )
    assert response.status_code >= 500
    m = eventually(server, lambda m: sample(m, "autoglm:request_failure_total") >= 1)
    assert sample(m, "autoglm:request_failure_total") == 1
    for reason in ("stop", "length", "abort"):
        assert sample(m, SUCCESS, finish_reason=reason) == 0
    assert sample(m, "autoglm:generation_tokens_total") == 0
    assert sample(m, "autoglm:engine_failed_steps_total") == 2  # its step, then it alone
    assert sample(m, "autoglm:ready") == 1  # a failed request does not end the loop
