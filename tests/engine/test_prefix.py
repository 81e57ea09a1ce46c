"""Cumulative token ids and logprobs in updates: views of the request's growing lists
(auto_glm.engine.outputs.Prefix) that read like lists and keep what they held when made;
the last update's are lists of their own."""

from __future__ import annotations

import queue

import pytest

from auto_glm import GLMModel, SamplingParams
from auto_glm.engine.outputs import Prefix, RequestOutput


def test_a_prefix_reads_like_the_list_it_was_taken_from() -> None:
    items = [10, 11, 12, 13, 14]
    view = Prefix(items)
    items += [15, 16]  # appended later: not in the view
    held = [10, 11, 12, 13, 14]
    assert len(view) == 5 and list(view) == held and view == held and held == view
    assert view != held[:4] and view != [*held, 15] and view != tuple(held)
    assert view == Prefix(held) and Prefix(items) != view
    for index in range(-5, 5):
        assert view[index] == held[index]
    for index in (5, -6):
        with pytest.raises(IndexError, match=f"index {index} is out of range for 5 items"):
            view[index]
    for start in (None, -7, -3, 0, 2, 5, 9):
        for stop in (None, -9, -1, 0, 3, 5, 8):
            for step in (None, 1, 2, -1, -2):
                got = view[start:stop:step]
                assert type(got) is list and got == held[start:stop:step]
    assert repr(view) == repr(held) and 13 in view and 15 not in view


def test_each_update_keeps_the_tokens_it_had_and_the_last_holds_lists(tiny_checkpoint) -> None:
    model = GLMModel(str(tiny_checkpoint), device="cpu", dtype="float32")
    try:
        updates: queue.Queue[RequestOutput | BaseException] = queue.Queue()
        params = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True, logprobs=2)
        model.engine.submit("hello", params, updates.put)
        seen = []
        while not seen or not seen[-1].finished:
            item = updates.get(timeout=60)
            assert not isinstance(item, BaseException)
            seen.append(item)
    finally:
        model.close()
    final = seen[-1].outputs
    assert type(final.token_ids) is list and type(final.logprobs) is list
    assert len(final.token_ids) == len(final.logprobs) == 9
    count = 0
    for update in seen:
        out = update.outputs
        count += len(out.delta_token_ids)
        assert out.token_ids == final.token_ids[:count]  # as it was when delivered
        assert list(out.logprobs) == final.logprobs[:count]
        if out.delta_token_ids:
            assert out.token_ids[-len(out.delta_token_ids) :] == out.delta_token_ids
    assert count == 9 and any(type(u.outputs.token_ids) is Prefix for u in seen[:-1])
