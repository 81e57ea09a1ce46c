"""``engine_process``: the server's engines in child processes, behind the same front end.

Real servers on 127.0.0.1 (built as ``autoglm serve --engine-process`` builds them) talked
to with the official ``openai`` client and httpx; each engine is a real child interpreter.
The replies are compared with the in-process server of the same checkpoint (``served``).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import openai
import pytest

from auto_glm.checkpoints import build_random_vision_checkpoint
from auto_glm.cluster.pipe import portable
from auto_glm.cluster.process import ProcessEngineClient
from auto_glm.cluster.process_main import STATS_EVERY_S
from auto_glm.engine.inputs import EngineInput
from auto_glm.engine.request import Request, RequestStatus
from auto_glm.loader import ModelLoadError
from auto_glm.observability.metrics import FinishedRequest
from auto_glm.sampling_params import SamplingParams
from auto_glm.serving import ServerConfig
from auto_glm.serving.config import ConfigError, load_config
from tests.fleet.conftest import FleetServer, start_fleet, stop_fleet
from tests.serving.conftest import TINY_KV, Served, free_port, hang_up_streams, until
from tests.serving.slow_engine import slow_engine
from tests.serving.vanishing_engine import vanishing_engine
from tests.vision_reference import chat_ids, make_image

pytestmark = pytest.mark.integration


def _config(checkpoint: Path, **more) -> ServerConfig:
    return ServerConfig(
        host="127.0.0.1",
        port=free_port(),
        log_level="warning",
        model_name_or_path=str(checkpoint),
        served_model_name="tiny",
        device="cpu",
        dtype="float32",
        kv_cache_memory=TINY_KV,
        engine_process=True,
        **more,
    )


def _engine(server: FleetServer) -> ProcessEngineClient:
    [version] = server.table.loaded()
    assert isinstance(version.engine, ProcessEngineClient)
    return version.engine


@pytest.fixture(scope="module")
def split(tiny_checkpoint: Path) -> Iterator[FleetServer]:
    server = start_fleet(_config(tiny_checkpoint, max_num_seqs=16))
    yield server
    stop_fleet(server)


def _ask(client: openai.OpenAI, model: str, prompt: str, **more) -> openai.types.Completion:
    return client.completions.create(
        model=model, prompt=prompt, max_tokens=24, temperature=0, **more
    )


def test_replies_and_streams_equal_the_in_process_servers(
    split: FleetServer, served: Served
) -> None:
    engine = _engine(split)
    assert engine.process.pid != os.getpid() and engine.process.poll() is None
    ours, theirs = split.openai(), served.openai()
    prompts = ["Hello", "The quick brown fox", "1 2 3 4"]
    for prompt in prompts:
        want = _ask(theirs, served.name, prompt)
        got = _ask(ours, "tiny", prompt)
        assert got.choices[0].text == want.choices[0].text
        assert got.usage == want.usage
        chunks = list(_ask(ours, "tiny", prompt, stream=True, logprobs=2))
        assert "".join(c.choices[0].text for c in chunks) == want.choices[0].text
        # a chunk per update; the updates that waited for the pipe together come as one
        streamed = list(_ask(theirs, served.name, prompt, stream=True, logprobs=2))
        tokens, values = (
            [[x for c in stream for x in getattr(c.choices[0].logprobs, field)] for stream in pair]
            for field, pair in (
                ("tokens", (chunks, streamed)),
                ("token_logprobs", (chunks, streamed)),
            )
        )
        assert len(tokens[0]) == 24 and tokens[0] == tokens[1]
        assert values[0] == pytest.approx(values[1], rel=1e-5)
        assert chunks[-1].choices[0].finish_reason == "length"
    chat = split.openai().chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=8,
        temperature=0,
        n=2,
        stop=["\n"],
    )
    want = theirs.chat.completions.create(
        model=served.name,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=8,
        temperature=0,
        n=2,
        stop=["\n"],
    )
    assert [c.message.content for c in chat.choices] == [c.message.content for c in want.choices]
    # the engine's counters reach /metrics from the child, with every request's end
    until(lambda: engine.stats().num_running == 0)
    metrics = httpx.get(f"{split.base_url}/metrics").text
    queries = next(
        line for line in metrics.splitlines() if line.startswith("autoglm:prefix_cache_queries")
    )
    assert float(queries.rsplit(" ", 1)[1]) > 0


def test_bad_input_is_refused_before_it_reaches_the_engine_process(split: FleetServer) -> None:
    client = split.openai()
    steps = _engine(split).stats().num_steps
    cases = [
        ({"prompt": "x " * 5000}, "max_model_len"),
        ({"prompt": "Hi", "logit_bias": {"99999999": 5}}, "logit_bias"),
        ({"prompt": [[10**9]]}, "outside the vocabulary"),
    ]
    for body, named in cases:
        with pytest.raises(openai.BadRequestError, match=named):
            client.completions.create(model="tiny", max_tokens=4, **body)
    with pytest.raises(openai.BadRequestError, match="schema"):
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "no-such-type"}},
            },
        )
    time.sleep(2 * STATS_EVERY_S)  # two of the child's counter reports
    assert _engine(split).stats().num_steps == steps  # nothing ran


def test_streams_closed_by_their_clients_are_aborted_in_the_engine_process(
    split: FleetServer,
) -> None:
    engine = _engine(split)
    reasons: list[str] = []
    engine.add_finish_listener(lambda _, output, __: reasons.append(output.outputs.finish_reason))

    until(lambda: engine.stats().num_running == 0)
    steps = engine.stats().num_steps
    assert hang_up_streams(split.base_url, 20) == [3] * 20
    until(lambda: len(reasons) == 20)  # the server sees each hang-up in its own time
    assert reasons == ["abort"] * 20
    # the child freed them: idle with its KV blocks back, long before 400 steps
    until(lambda: engine.stats().num_running == 0 and engine.stats().kv_usage == 0)
    assert engine.stats().num_steps - steps < 400


def test_a_stream_whose_delivery_fails_here_is_aborted_there(
    split: FleetServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(split)
    until(lambda: engine.stats().num_running == 0)
    steps = engine.stats().num_steps
    errors: list[BaseException] = []
    params = SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)
    request = engine.submit([5, 6, 7], params, errors.append)

    accumulator = engine._streams[request.request_id].output
    add = type(accumulator).add

    def broken(self, item):  # this request's detokenizing fails
        if self is accumulator:
            raise RuntimeError("detokenizer fault")
        return add(self, item)

    monkeypatch.setattr(type(accumulator), "add", broken)
    until(lambda: [str(e) for e in errors] == ["detokenizer fault"])
    # the child stopped generating for it, long before the 2,000 tokens asked for
    until(lambda: engine.stats().num_running == 0 and engine.stats().kv_usage == 0)
    assert engine.stats().num_steps - steps < 100


def test_a_killed_engine_process_ends_its_requests_and_fails_health(
    tiny_checkpoint: Path,
) -> None:
    server = start_fleet(_config(tiny_checkpoint))
    try:
        engine = _engine(server)
        with httpx.Client(base_url=server.base_url, timeout=30) as http:
            body = {"prompt": "Hello", "max_tokens": 400, "ignore_eos": True, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as response:
                lines = response.iter_lines()
                assert next(line for line in lines if line.startswith("data:"))
                os.kill(engine.process.pid, signal.SIGKILL)
                rest = [line for line in lines if line]
            # the stream ends with an error event that names why, not with a hang
            assert rest[-1] == "data: [DONE]", rest
            error = json.loads(rest[-2].removeprefix("data: "))["error"]
            assert error["code"] == "engine_dead"
            assert "engine process exited (code -9)" in error["message"]
            health = http.get("/health")
            assert health.status_code == 503
            refused = http.post(
                "/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2}
            )
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "engine_dead"
            assert "restart the server" in refused.json()["error"]["message"]
            # the model list says so too (it said ready)
            (card,) = http.get("/v1/models").json()["data"]
            assert (card["state"], card["versions"][0]["state"]) == ("failed", "failed")
    finally:
        stop_fleet(server)


def test_queue_and_prefill_times_are_the_engines_own(tiny_checkpoint: Path) -> None:
    """The metrics split a request's wait at the engine's stamps (first scheduled, first
    token), which cross from the engine process as ages, not as its clock's readings.
    Every step there sleeps ``delay`` and one request runs at a time: A is scheduled at once
    and its first token comes a step later; B waits for A's three steps, then takes one."""
    delay = 0.2
    build = partial(
        slow_engine, str(tiny_checkpoint), delay, kv_cache_memory=TINY_KV, max_num_seqs=1
    )
    engine = ProcessEngineClient.start(build, "tiny")
    try:
        finished: dict[str, FinishedRequest] = {}
        engine.add_finish_listener(
            lambda request, output, error: finished.__setitem__(
                request.request_id, FinishedRequest.of(request, output)
            )
        )
        for name, tokens in (("a", 3), ("b", 1)):
            params = SamplingParams(max_tokens=tokens, ignore_eos=True)
            engine.submit([1, 2, 3], params, lambda item: None, request_id=name)
        until(lambda: len(finished) == 2, timeout=30)
    finally:
        engine.shutdown()
    a, b = finished["a"], finished["b"]
    assert a.queue < delay / 2 and a.prefill >= delay, a
    assert b.queue >= 2 * delay and b.prefill >= delay, b


def _statuses_seen(requests: dict[str, Request], until_done, timeout: float) -> set[tuple]:
    """Poll the parent's ``requests`` every few ms until ``until_done()``: every distinct
    (name, status, has a token yet) seen."""
    seen: set[tuple] = set()

    def snapshot() -> bool:
        seen.update((n, r.status, bool(r.output_token_ids)) for n, r in requests.items())
        return until_done()

    until(snapshot, timeout=timeout)
    return seen


def test_a_request_prefilled_there_runs_here_before_its_first_token(tiny_checkpoint: Path):
    """Admission counts the requests whose status is waiting: A's 64-token prompt is
    prefilled in 4 chunks of 16 (0.2 s each) with B waiting behind it (one at a time).
    Here A is running from its first chunk, long before its first token, while B waits;
    then B runs and both finish."""
    build = partial(
        slow_engine, str(tiny_checkpoint), 0.2, kv_cache_memory=TINY_KV, max_num_seqs=1,
        max_num_batched_tokens=16,
    )  # fmt: skip
    engine = ProcessEngineClient.start(build, "tiny")
    try:
        params = SamplingParams(max_tokens=2, ignore_eos=True)
        requests = {
            name: engine.submit(prompt, params, lambda item: None, request_id=name)
            for name, prompt in (("a", list(range(1, 65))), ("b", [1, 2, 3]))
        }
        done = lambda: all(r.status is RequestStatus.FINISHED for r in requests.values())  # noqa: E731
        seen = _statuses_seen(requests, done, timeout=30)
    finally:
        engine.shutdown()
    a_prefilling = ("a", RequestStatus.RUNNING, False)
    assert a_prefilling in seen and ("b", RequestStatus.WAITING, False) in seen, seen
    assert ("b", RequestStatus.RUNNING, False) in seen or ("b", RequestStatus.RUNNING, True) in seen


def test_a_request_preempted_there_waits_here(tiny_checkpoint: Path) -> None:
    """Two requests that need 8 blocks of 4 tokens between them share 6 (the tiny model's
    K/V take 512 bytes a token): one is preempted there (put back in the queue, its KV to
    be recomputed) and waits, here too, until the other ends."""
    build = partial(
        slow_engine, str(tiny_checkpoint), 0.05, kv_cache_memory=6 * 4 * 512, block_size=4,
        max_num_seqs=2, enable_prefix_caching=False,
    )  # fmt: skip
    engine = ProcessEngineClient.start(build, "tiny")
    try:
        params = SamplingParams(max_tokens=12, ignore_eos=True)
        requests = {
            name: engine.submit([start, start + 1, start + 2, start + 3], params,
                                lambda item: None, request_id=name)
            for name, start in (("a", 1), ("b", 100))
        }  # fmt: skip
        done = lambda: all(r.status is RequestStatus.FINISHED for r in requests.values())  # noqa: E731
        seen = _statuses_seen(requests, done, timeout=60)
    finally:
        engine.shutdown()
    preempted = {(name, has_token) for name, status, has_token in seen
                 if status is RequestStatus.PREEMPTED}  # fmt: skip
    assert preempted and all(has_token for _, has_token in preempted), seen
    assert sum(r.metrics.num_preemptions for r in requests.values()) >= 1
    assert all(len(r.output_token_ids) == 12 for r in requests.values())


def _greedy(engine, prompt: EngineInput) -> list[int]:
    finished: queue.Queue = queue.Queue()
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine.submit(prompt, params, lambda item: item.finished and finished.put(item))
    return finished.get(timeout=60).outputs.token_ids


def test_the_front_end_uses_the_tokenizer_and_image_processor_the_engine_loaded(
    tmp_path: Path,
) -> None:
    """The engine process's tokenizer and image processor cross the pipe with its
    description. The front end used to load its own from the model's path: files that a
    registered version verified only in the engine process, and that may have changed
    since; here they are gone, and a screenshot request is answered as in process."""
    vision = build_random_vision_checkpoint(tmp_path / "glm4v", seed=2)
    local = slow_engine(str(vision), 0.0, kv_cache_memory=TINY_KV)
    build = partial(vanishing_engine, str(vision), kv_cache_memory=TINY_KV)
    remote = ProcessEngineClient.start(build, "glm4v")
    try:
        assert not Path(remote.loaded.path).exists()
        text = "a <|user|> b"
        assert remote.tokenizer.encode(text) == local.tokenizer.encode(text)
        ids = chat_ids(local.tokenizer, 1, "What is it?")
        replies = [
            _greedy(engine, engine.prepare(ids, [make_image(48, 40, 3)]))
            for engine in (local, remote)
        ]
    finally:
        local.shutdown()
        remote.shutdown()
    assert replies[0] == replies[1] and len(replies[0]) == 6


def test_a_model_that_fails_to_load_there_raises_its_error_here(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="model_type|architectures"):
        start_fleet(_config(tmp_path))


def test_engine_process_with_ray_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="drop --engine-process"):
        load_config(overrides={"engine_process": True, "ray": True}, environ={})


def test_a_build_from_the_script_run_as_main_is_refused_with_the_fix() -> None:
    def build():
        raise AssertionError("never called: the engine process could not import it")

    build.__module__ = "__main__"
    with pytest.raises(ValueError, match="define it in a module"):
        ProcessEngineClient.start(partial(build), "tiny")


def test_an_error_that_cannot_cross_the_pipe_crosses_as_one_that_names_it() -> None:
    class Held(RuntimeError):
        def __init__(self) -> None:
            super().__init__("held a lock")
            self.lock = threading.Lock()  # cannot be pickled

    crossed = portable(Held())
    assert type(crossed) is RuntimeError and str(crossed) == "Held: held a lock"
    refused = ValueError("prompt too long")
    assert portable(refused) is refused  # the caller's error keeps its type
