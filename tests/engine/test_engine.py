"""The whole engine on a tiny model: batching, preemption, prefix cache, sampling, stops, abort."""

from __future__ import annotations

import asyncio
import queue
import shutil
import threading
import time
from collections import Counter

import pytest

from auto_glm import GLMModel, SamplingParams
from auto_glm.engine.async_engine import AsyncEngine
from auto_glm.engine.client import EngineClient
from auto_glm.engine.request import FinishReason, Request
from auto_glm.kernels import cpu_kernels
from auto_glm.layers.attention_backends import CpuBackend
from tests.reference import hf_greedy, random_prompts

ARCH = "Glm4ForCausalLM"
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def path(make_checkpoint):
    return make_checkpoint(ARCH, seed=3, partial_rotary_factor=0.5, head_dim=16)


def _model(path, **options) -> GLMModel:
    return GLMModel(str(path), device="cpu", dtype="float32", **options)


def _settled(model: GLMModel) -> bool:
    """The loop frees a request one step after the caller has its result (e.g. a stop
    string matched on the output thread): wait, bounded, for it to drain."""
    for _ in range(200):
        stats = model.engine.stats()
        if (stats.num_running, stats.num_waiting, stats.kv_usage) == (0, 0, 0):
            return True
        time.sleep(0.01)
    return False


def _vocab(model: GLMModel) -> int:
    return model.engine.loaded.model.spec.vocab_size


def _finished_requests(client: EngineClient) -> queue.Queue[Request]:
    """The engine-side Request of every request that ends from now on, as it ends."""
    finished: queue.Queue[Request] = queue.Queue()
    client.add_finish_listener(lambda request, output, exc: finished.put(request))
    return finished


def _lockstep(client: EngineClient) -> None:
    """Make the engine loop wait, after each step, until the output thread has delivered
    that step's outputs: a stop string found in step k then reaches the loop before step
    k + 1, so the number of steps the engine runs is exact instead of a race."""
    core = client.core
    done = threading.Condition()
    counts = {"published": 0, "delivered": 0}
    deliver, publish = client._deliver, core._publish

    def counted_deliver(out):
        try:
            deliver(out)
        finally:
            with done:
                counts["delivered"] += 1
                done.notify_all()

    def waiting_publish(batch):
        publish(batch)
        with done:
            counts["published"] += len(batch)
            done.wait_for(lambda: counts["delivered"] >= counts["published"], timeout=10)

    client._deliver = counted_deliver
    core._publish = waiting_publish


def _hold_after(client: EngineClient, num_tokens: int) -> threading.Event:
    """Stop the engine loop once it has published ``num_tokens`` tokens, until the returned
    event is set (or 10 s pass)."""
    core, release = client.core, threading.Event()
    publish, seen = core._publish, [0]

    def holding_publish(batch):
        publish(batch)
        seen[0] += sum(len(out.new_token_ids) for out in batch)
        if seen[0] >= num_tokens:
            release.wait(timeout=10)

    core._publish = holding_publish
    return release


def _count_decode_paths(model: GLMModel) -> Counter:
    """Count, from now on, decode attention calls per path: "kernel" or "torch"."""
    calls: Counter = Counter()

    def counting(path, fn):
        def call(*args):
            calls[path] += 1
            return fn(*args)

        return call

    backends = {attn.backend for attn in model.engine.loaded.model.attention_layers()}
    assert len(backends) == 1, backends  # one backend serves every layer
    backend = backends.pop()
    path = "kernel" if isinstance(backend, CpuBackend) else "torch"
    backend.decode = counting(path, backend.decode)
    return calls


# the native CPU kernels and the plain torch path
KERNEL_OR_TORCH = pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernels", "torch"])


def _require_kernels(kernel: bool) -> None:
    """The kernel variant runs only where the kernels exist: it skips, saying why, without a
    C++ compiler, and fails where one is present but the build did not work."""
    if not kernel:
        return
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler (c++): the native CPU kernels cannot be built here")
    assert cpu_kernels() is not None, "a C++ compiler is present but the kernels did not build"


def _assert_decode_path(calls: Counter, kernel: bool) -> None:
    path = "kernel" if kernel else "torch"
    assert calls[path] > 0 and set(calls) == {path}, calls


@KERNEL_OR_TORCH
def test_many_concurrent_requests_equal_transformers(path, kernel):
    _require_kernels(kernel)
    options = {"max_num_seqs": 16, "max_num_batched_tokens": 64, "cpu_kernels": kernel}
    with _model(path, **options) as model:
        calls = _count_decode_paths(model)
        prompts = random_prompts(_vocab(model), [3 + 9 * i for i in range(18)], seed=1)
        results = model.generate_batch(prompts, GREEDY)
        assert model.engine.stats().kv_usage == 0
    _assert_decode_path(calls, kernel)
    assert [r.token_ids for r in results] == hf_greedy(path, prompts, GREEDY.max_tokens)


def test_float16_math_keeps_to_the_torch_path(path):
    # the kernels are built for float32 and bfloat16 only; a float16 model must not reach them
    options = {"dtype": "float16", "compute_dtype": "float16"}
    with GLMModel(str(path), device="cpu", **options) as model:
        layers = model.engine.loaded.model.modules()
        assert not any(getattr(m, "_kernels", None) for m in layers)
        assert model.engine.loaded.model.attention_layers()[0].backend.name == "torch"
        prompts = random_prompts(_vocab(model), [5, 40], seed=6)
        results = model.generate_batch(prompts, GREEDY)
    assert [len(r.token_ids) for r in results] == [GREEDY.max_tokens] * 2


@KERNEL_OR_TORCH
def test_preemption_keeps_outputs_exact(path, kernel):
    _require_kernels(kernel)
    # 12 blocks of 16 slots cannot hold 8 requests of ~60 tokens: some are preempted
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # K and V, 2 layers, 16 slots, 2 kv heads, dim 16, fp32
    options = {"kv_cache_memory": 12 * block_bytes, "cpu_kernels": kernel}
    with _model(path, max_num_seqs=8, max_model_len=128, **options) as model:
        assert model.engine.num_blocks == 12
        calls = _count_decode_paths(model)
        prompts = random_prompts(_vocab(model), [40 + 3 * i for i in range(8)], seed=2)
        params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
        results = model.generate_batch(prompts, params)
        stats = model.engine.stats()
    _assert_decode_path(calls, kernel)
    assert stats.num_preemptions > 0
    assert stats.kv_usage == 0
    assert [r.token_ids for r in results] == hf_greedy(path, prompts, 20)


def test_shared_prefix_hits_the_cache(path):
    with _model(path, max_num_seqs=8) as model:
        prefix = random_prompts(_vocab(model), [48], seed=3)[0]
        tails = random_prompts(_vocab(model), [5, 9, 13, 17], seed=4)
        prompts = [prefix + tail for tail in tails]
        first = model.generate_batch(prompts[:1], GREEDY)
        rest = model.generate_batch(prompts[1:], GREEDY)
        stats = model.engine.stats()
    assert stats.prefix_cache_hits >= 3 * 48  # three full prefix blocks per later request
    assert [r.token_ids for r in first + rest] == hf_greedy(path, prompts, GREEDY.max_tokens)


def test_cache_salt_separates_tenants(path):
    with _model(path) as model:
        prompt = random_prompts(_vocab(model), [64], seed=5)[0]
        engine = model.engine

        def run(salt):
            before = engine.stats().prefix_cache_hits
            asyncio.run(_drain(AsyncEngine(engine).generate(prompt, GREEDY, cache_salt=salt)))
            return engine.stats().prefix_cache_hits - before

        assert run("tenant-a") == 0
        assert run("tenant-a") == 48
        assert run("tenant-b") == 0
        assert run(None) == 0


async def _drain(stream):
    return [item async for item in stream]


def test_seed_gives_the_same_sample(path):
    with _model(path) as model:
        prompt = random_prompts(_vocab(model), [10], seed=6)
        sampled = [
            SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=s, ignore_eos=True)
            for s in (7, 7, 8)
        ]
        a, b, c = (model.generate_batch(prompt, p)[0].token_ids for p in sampled)
        # the same seed inside a busy batch still gives the same tokens
        crowd = model.generate_batch(
            prompt * 4 + random_prompts(_vocab(model), [30, 50]), sampled[0]
        )
    assert a == b
    assert a != c
    assert all(r.token_ids == a for r in crowd[:4])


def stop_string_run(model: GLMModel) -> tuple:
    """A 12-token prompt continued freely, then again with a stop string from the middle of
    that text, the engine in lockstep with the output thread: (free, cut, engine steps the
    cut request took, its engine-side Request). Checks the cut text and tokens."""
    prompt = random_prompts(_vocab(model), [12], seed=9)
    free = model.generate_batch(
        prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    )[0]
    stop = free.text[len(free.text) // 2 :][:3]
    assert stop.strip() and "\ufffd" not in stop, "pick a prompt whose output has plain text"
    _lockstep(model.engine)
    finished = _finished_requests(model.engine)
    steps_before = model.engine.stats().num_steps
    cut = model.generate_batch(
        prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop])
    )[0]
    assert _settled(model)
    steps = model.engine.stats().num_steps - steps_before
    request = finished.get(timeout=10)
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.index(stop)]
    assert 0 < len(cut.token_ids) < len(free.token_ids)
    assert cut.token_ids == free.token_ids[: len(cut.token_ids)]
    return free, cut, steps, request


def test_stop_string_is_cut_and_stops(path):
    with _model(path) as model:
        free, cut, steps, request = stop_string_run(model)
    # the engine itself stopped at the token that completed the stop string: one step per
    # token (the 12-token prompt fits one step), none after it
    assert steps == len(cut.token_ids)
    assert request.output_token_ids == cut.token_ids
    assert request.finish_reason is FinishReason.STOP and request.block_ids == []


def test_abort_frees_everything(path):
    with _model(path) as model:
        engine = AsyncEngine(model.engine)
        prompt = random_prompts(_vocab(model), [40], seed=10)[0]
        # the loop waits after its 3rd token until the abort is queued: one step per token
        # (the 40-token prompt fits one step), so exactly 3 steps run if the abort stops it
        release = _hold_after(model.engine, 3)
        finished = _finished_requests(model.engine)
        steps_before = model.engine.stats().num_steps

        async def run():
            seen = 0
            async for _ in engine.generate(prompt, SamplingParams(max_tokens=200, ignore_eos=True)):
                seen += 1
                if seen == 3:
                    break  # leaving the stream aborts the request

        asyncio.run(run())
        release.set()
        request = finished.get(timeout=10)
        assert _settled(model)
        assert model.engine.stats().num_steps - steps_before == 3
        assert request.finish_reason is FinishReason.ABORT
        assert request.num_output_tokens == 3 and request.block_ids == []
        # and the engine keeps serving
        assert len(model.generate_batch([prompt], GREEDY)[0].token_ids) == GREEDY.max_tokens


def test_a_kv_cache_over_the_free_memory_is_refused_naming_both(path):
    # it failed in torch's allocator ("DefaultCPUAllocator: can't allocate memory")
    with pytest.raises(ValueError) as refused:
        _model(path, kv_cache_memory=1 << 50)
    message = str(refused.value)
    assert message.startswith(f"kv_cache_memory={1 << 50} bytes (1048576.0 GiB) is more than")
    assert "GiB free on cpu" in message and "lower kv_cache_memory" in message


def test_a_max_model_len_past_the_models_context_is_clamped_with_a_warning(path, caplog):
    with (
        caplog.at_level("WARNING", logger="auto_glm.engine"),
        _model(path, max_model_len=10**8) as model,
    ):
        limit = model.engine.loaded.max_model_len
        assert model.engine.max_model_len == limit < 10**8
    assert f"max_model_len=100000000 is past {path.name}'s context" in caplog.text
    assert f"serving {limit} tokens at most" in caplog.text


def test_a_kv_cache_shorter_than_max_model_len_clamps_it_with_a_warning(path, caplog):
    # every request that may grow to max_model_len was refused ("the cache holds only ..."),
    # as is every chat call without max_tokens on a server: it asks for the context's rest
    with (
        caplog.at_level("WARNING", logger="auto_glm.engine"),
        _model(path, kv_cache_memory=64 << 10, block_size=4) as model,
    ):
        engine = model.engine
        capacity = engine.num_blocks * 4
        assert engine.max_model_len == capacity + 1 < engine.loaded.max_model_len
        endless = SamplingParams(max_tokens=10**6, temperature=0, ignore_eos=True)
        [out] = model.generate_batch([[5, 6, 7]], endless)
        assert (len(out.token_ids), out.finish_reason) == (capacity - 2, "length")
        with pytest.raises(ValueError, match=f"max_model_len is {capacity + 1}"):
            model.generate_batch([[5] * (capacity + 1)], GREEDY)
    assert (
        f"the KV cache holds {capacity} tokens (kv_cache_memory=65536 bytes), fewer than "
        f"max_model_len={engine.loaded.max_model_len}: serving {capacity + 1} tokens at most"
    ) in caplog.text


def test_limits_are_checked_before_anything_runs(path):
    with _model(path, max_model_len=64) as model:
        too_long = random_prompts(_vocab(model), [64])[0]
        with pytest.raises(ValueError, match="max_model_len is 64"):
            model.generate_batch([too_long], GREEDY)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            model.generate_batch([[_vocab(model)]], GREEDY)
        assert model.engine.stats().kv_usage == 0
