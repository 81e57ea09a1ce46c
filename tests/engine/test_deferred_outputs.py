"""Deltas held until the next step's launch (``EngineCore.defer_outputs``, the default on a
GPU), checked on the CPU by switching it on: the same results, each step's deltas published
only once the next forward pass is launched, and a stop string one step late."""

from __future__ import annotations

import itertools

import pytest

from auto_glm import GLMModel, SamplingParams
from tests.engine.test_engine import stop_string_run
from tests.reference import random_prompts

ARCH = "Glm4ForCausalLM"


@pytest.fixture(scope="module")
def path(make_checkpoint):
    return make_checkpoint(ARCH, seed=3, partial_rotary_factor=0.5, head_dim=16)


def _record(model: GLMModel) -> list[str]:
    """From now on, in order: 'launch' for each forward pass handed over, 'step' as each
    step returns and 'publish' for each batch of deltas handed to the output thread."""
    core = model.engine.core
    events: list[str] = []
    publish, launched, step = core._publish, core.runner.after_launch, core.step

    def recording_step():
        produced = step()
        events.append("step")
        return produced

    def recording_publish(batch):
        events.append("publish")
        publish(batch)

    def recording_launch():
        events.append("launch")
        launched()

    core._publish = recording_publish
    core.runner.after_launch = recording_launch
    core.step = recording_step
    return events


def _run(model: GLMModel, defer: bool, events: list[str]) -> tuple[list, list[str]]:
    model.engine.core.defer_outputs = defer
    events.clear()
    vocab = model.engine.loaded.model.spec.vocab_size
    prompts = random_prompts(vocab, [5, 17, 9, 30], seed=4)
    results = [
        model.generate_batch(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        for n in (1, 9)
    ]
    return [(r.token_ids, r.text, r.finish_reason) for batch in results for r in batch], events[:]


def test_held_deltas_reach_every_stream_unchanged_and_after_the_next_launch(path) -> None:
    with GLMModel(str(path), device="cpu", dtype="float32", max_num_seqs=3) as model:
        assert model.engine.core.defer_outputs is False  # the CPU runs synchronously
        events = _record(model)
        eager, eager_events = _run(model, False, events)
        held, held_events = _run(model, True, events)
    assert held == eager
    assert all(reason == "length" for _, _, reason in held)

    def published_at_launch(events: list[str]) -> int:
        return sum(a == "launch" and b == "publish" for a, b in itertools.pairwise(events))

    # published as soon as a step ends: never at a launch, where nothing is held
    assert published_at_launch(eager_events) == 0
    assert eager_events.count("launch") == held_events.count("launch")
    # held: each step's deltas go out as the next step launches; only the last steps of a
    # batch, with nothing launched after them, are published as the loop goes idle
    assert published_at_launch(held_events) >= 8
    assert held_events.count("publish") < eager_events.count("publish") + 4


def test_a_stop_string_costs_one_more_step_when_deltas_are_held(path) -> None:
    with GLMModel(str(path), device="cpu", dtype="float32") as model:
        model.engine.core.defer_outputs = True
        free, cut, steps, request = stop_string_run(model)
    # the step after the one that completed the stop string had already been launched
    assert steps == len(cut.token_ids) + 1
    assert request.output_token_ids == free.token_ids[: len(cut.token_ids) + 1]
