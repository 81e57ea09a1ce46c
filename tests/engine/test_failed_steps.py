"""A step whose forward pass raises fails neither the engine nor the requests it shared:
each of its requests runs again alone, only the one that fails alone ends with an error,
the rest end token-exact, the K/V the step was to write is never served from the prefix
cache, and only failed steps in a row stop the loop.

The fault stands in for what a device does and cannot be caused on demand here (out of
memory, a kernel's error): a forward pre-hook on the real model's embedding raises when a
step feeds the token FAULT, or on a given forward call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest
import torch

from auto_glm import GLMModel, SamplingParams
from auto_glm.engine.client import EngineRequestError
from auto_glm.engine.core import MAX_FAILED_STEPS, EngineDeadError
from tests.engine.jobs import run_together
from tests.engine.test_nonfinite import _settled
from tests.engine.test_overlap import _model as overlap_model
from tests.engine.test_overlap import _record_plans
from tests.reference import hf_greedy, random_prompts
from tests.serving.conftest import start_service, stop_service, until
from tests.triton_env import require_triton_interpreter

ARCH = "LlamaForCausalLM"
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
FAULT = 3  # the token whose steps fail
FAILED = (
    "the engine failed this request: its step raised RuntimeError: injected fault, also when "
    "the request ran alone (the requests that shared the step ran on); see the server log"
)


@pytest.fixture(scope="module")
def path(make_checkpoint):
    return make_checkpoint(ARCH, seed=5)


class Fault:
    """Makes ``model``'s forward pass raise when ``when(input_ids)`` holds, ``times`` times
    at most (None: always); counts the forward calls and the faults raised."""

    def __init__(
        self, model: GLMModel, when: Callable[[torch.Tensor], bool], times: int | None = None
    ) -> None:
        self.when, self.times, self.calls, self.raised = when, times, 0, 0
        embed = model.engine.loaded.model.model.embed_tokens
        self._handle = embed.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple) -> None:
        self.calls += 1
        if (self.times is None or self.raised < self.times) and self.when(args[0]):
            self.raised += 1
            raise RuntimeError("injected fault")

    def remove(self) -> None:
        self._handle.remove()


def feeds_fault(input_ids: torch.Tensor) -> bool:
    return bool((input_ids == FAULT).any())


def _prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    return [[t for t in p if t != FAULT] for p in random_prompts(vocab, lengths, seed)]


@pytest.fixture
def model(path) -> Iterator[GLMModel]:
    with GLMModel(str(path), device="cpu", dtype="float32", max_num_seqs=8) as model:
        yield model


def _vocab(model: GLMModel) -> int:
    return model.engine.loaded.model.spec.vocab_size


def test_only_the_request_at_fault_fails_and_those_that_shared_its_step_end_token_exact(
    path, model
) -> None:
    Fault(model, feeds_fault)
    plans = _record_plans(model)
    healthy = _prompts(_vocab(model), [9, 14, 6], seed=1)
    bad = [FAULT, *healthy[0]]
    # all in before the first step: one step runs the three, and fails
    jobs = [(p, GREEDY) for p in [healthy[0], bad, healthy[1], healthy[2]]]
    results, requests = run_together(model, jobs, hold=True)
    assert _settled(model)
    ids = [r.request_id for r in requests]
    # the failed step, then each of its requests alone, in order, then the rest together
    assert plans[:4] == [(False, ids), (False, ids[:1]), (False, ids[1:2]), (False, ids[2:3])]
    assert all(len(step) > 1 for _, step in plans[5:8])
    failed = results.pop(1)
    assert isinstance(failed, EngineRequestError) and str(failed) == FAILED
    assert [r.outputs.token_ids for r in results] == hf_greedy(path, healthy, GREEDY.max_tokens)
    assert [r.num_preemptions for r in requests] == [1, 1, 1, 1]
    stats = model.engine.stats()
    assert stats.num_failed_steps == 2 and model.engine.core.is_alive


def test_a_fault_that_does_not_recur_costs_a_rerun_not_the_request(path, model) -> None:
    fault = Fault(model, feeds_fault, times=1)
    prompts = [[FAULT, 5, 9, 7], *_prompts(_vocab(model), [8], seed=7)]
    outputs = model.generate_batch(prompts, GREEDY)
    assert fault.raised == 1 and model.engine.stats().num_failed_steps == 1
    assert [o.token_ids for o in outputs] == hf_greedy(path, prompts, GREEDY.max_tokens)


def test_requests_that_do_not_share_the_failed_step_are_untouched(path) -> None:
    with GLMModel(str(path), device="cpu", dtype="float32", max_num_seqs=1) as model:
        Fault(model, feeds_fault)
        healthy = _prompts(_vocab(model), [11, 5], seed=2)
        jobs = [([FAULT, 7, 8], GREEDY), *[(p, GREEDY) for p in healthy]]
        results, requests = run_together(model, jobs, hold=True)
        assert _settled(model)
    failed = results.pop(0)
    assert isinstance(failed, EngineRequestError) and str(failed) == FAILED
    # one at a time: the others waited while it failed, then ran
    assert all(
        r.metrics.first_scheduled_time > requests[0].metrics.finished_time for r in requests[1:]
    )
    assert [r.num_preemptions for r in requests[1:]] == [0, 0]
    assert [r.outputs.token_ids for r in results] == hf_greedy(path, healthy, GREEDY.max_tokens)


def test_a_retry_computes_afresh_what_the_failed_step_was_to_write(path, model) -> None:
    # Its full prompt blocks were indexed for the prefix cache when the step was planned;
    # the forward pass never wrote their K/V, so a retry must not hit them.
    prompt = [FAULT, *_prompts(_vocab(model), [40], seed=3)[0]]  # 41 tokens: 2 full blocks
    fault = Fault(model, feeds_fault, times=2)  # in its step, and again alone
    with pytest.raises(EngineRequestError, match=r"^the engine failed this request: its step"):
        model.generate_batch([prompt], GREEDY)
    assert fault.raised == 2 and _settled(model)
    results, _ = run_together(model, [(prompt, GREEDY)])
    assert results[0].outputs.token_ids == hf_greedy(path, [prompt], GREEDY.max_tokens)[0]
    assert results[0].num_cached_tokens == 0
    # the retry indexed them afresh: the next one hits them
    hit, _ = run_together(model, [(prompt, GREEDY)])
    assert hit[0].num_cached_tokens == 32
    assert hit[0].outputs.token_ids == results[0].outputs.token_ids


def test_failed_steps_in_a_row_stop_the_engine(model) -> None:
    Fault(model, feeds_fault)
    bad = [FAULT, 9, 10]
    for _ in range(MAX_FAILED_STEPS - 1):  # its step fails, then it alone: that one not counted
        with pytest.raises(EngineRequestError, match=r"^the engine failed this request"):
            model.generate_batch([bad], GREEDY)
    expected = rf"^the engine loop stopped: {MAX_FAILED_STEPS} engine steps in a row failed, .*"
    expected += r"RuntimeError\('injected fault'\); the device, not a request, is at fault: restart"
    with pytest.raises(EngineRequestError, match=expected):
        model.generate_batch([bad], GREEDY)
    assert not model.engine.core.is_alive
    with pytest.raises(EngineDeadError, match="restart the server"):
        model.generate_batch([[9, 10]], GREEDY)


def test_a_step_that_succeeds_between_failures_resets_the_count(model) -> None:
    Fault(model, feeds_fault)
    for _ in range(MAX_FAILED_STEPS + 1):
        with pytest.raises(EngineRequestError, match=r"^the engine failed this request"):
            model.generate_batch([[FAULT, 9, 10]], GREEDY)
        assert model.generate_batch([[9, 10]], GREEDY)[0].token_ids
    assert model.engine.stats().num_failed_steps == 2 * (MAX_FAILED_STEPS + 1)
    assert model.engine.core.is_alive


def test_a_failed_step_planned_ahead_reruns_the_requests_of_both_steps(path) -> None:
    """With overlap the step planned ahead is launched before the one running is read back:
    a fault in it sends the requests of both back to run alone, planned in turn, and then
    together and ahead again; they end token-exact."""
    require_triton_interpreter()
    with overlap_model(path, True, max_num_seqs=4) as model:
        plans = _record_plans(model)
        prompts = _prompts(_vocab(model), [5, 7], seed=4)
        fault = Fault(model, lambda ids: fault.calls == 3)  # the second decode step
        results, requests = run_together(model, [(p, GREEDY) for p in prompts], hold=True)
        assert fault.raised == 1 and _settled(model)
        assert model.engine.core._in_flight is None
    ids = [r.request_id for r in requests]
    assert plans[2] == (True, ids)  # the launch that failed: planned ahead, of both
    assert plans[3:5] == [(False, ids[:1]), (False, ids[1:])]  # each alone, in turn
    assert any(ahead and len(step) == 2 for ahead, step in plans[5:])  # then overlapped
    assert [r.outputs.token_ids for r in results] == hf_greedy(path, prompts, GREEDY.max_tokens)


def test_the_server_answers_500_engine_error_and_counts_the_step(path) -> None:
    served, thread = start_service(path)
    try:
        Fault(served.model, feeds_fault)
        url = f"{served.base_url}/v1/completions"
        body = {"model": served.name, "max_tokens": 4, "temperature": 0}
        bad = httpx.post(url, json={**body, "prompt": [FAULT, 7, 8]}, timeout=60)
        assert bad.status_code == 500
        error = bad.json()["error"]
        assert error["code"] == "engine_error" and FAILED in error["message"]
        with httpx.stream("POST", url, json={**body, "prompt": [9, FAULT], "stream": True}) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert FAILED in events[-2] and events[-1] == "data: [DONE]"
        good = httpx.post(url, json={**body, "prompt": [7, 8, 9]}, timeout=60)
        assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] == "length"
        assert httpx.get(f"{served.base_url}/health", timeout=10).status_code == 200
        metrics = httpx.get(f"{served.base_url}/metrics", timeout=10).text
        assert "\nautoglm:engine_failed_steps_total{" in metrics
        line = next(
            x for x in metrics.splitlines() if x.startswith("autoglm:engine_failed_steps_total{")
        )
        assert line.endswith(" 4.0")  # each bad request's step, then the request alone
        served.wait_idle()
    finally:
        stop_service(served, thread)


def test_a_stream_whose_delivery_fails_ends_with_the_error_and_frees_its_request(
    model,
) -> None:
    """The output thread's work for one request raising (its detokenizing, stop strings)
    ends that request's stream with the error, and the engine stops generating for it."""
    errors: list[BaseException] = []
    params = SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)
    engine = model.engine
    steps = engine.stats().num_steps
    request = engine.submit([5, 6, 7], params, lambda o: errors.append(o))

    def broken(*args):
        raise RuntimeError("detokenizer fault")

    engine._streams[request.request_id].processor.process = broken
    until(lambda: [str(e) for e in errors] == ["detokenizer fault"])
    assert _settled(model)
    assert engine.stats().num_steps - steps < 100  # not the 2,000 tokens asked for
    assert model.generate_batch([[5, 6, 7]], GREEDY)[0].token_ids  # the others run on
