"""Cumulative token ids and logprobs in updates: views of the request's growing lists
(auto_glm.engine.outputs.Prefix) that read like lists and keep what they held when made;
the last update's are lists of their own. Cumulative text: a view of the request's text
pieces (TextSoFar), joined when read, as a ``str``."""

from __future__ import annotations

import copy
import queue
import threading

import pytest

from auto_glm import GLMModel, SamplingParams
from auto_glm.engine.output_processor import StopStringMatcher
from auto_glm.engine.outputs import (
    CompletionOutput,
    Prefix,
    RequestOutput,
    Text,
    TextSoFar,
    with_delta,
)


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
    assert all(type(u.outputs.__dict__["_text"]) is TextSoFar for u in seen)  # none joined
    assert type(final.text) is str and final.text == model.tokenizer.decode(final.token_ids)
    assert type(final.token_ids) is list and type(final.logprobs) is list
    assert len(final.token_ids) == len(final.logprobs) == 9
    count = 0
    for update in seen:
        out = update.outputs
        count += len(out.delta_token_ids)
        assert out.token_ids == final.token_ids[:count]  # as it was when delivered
        # a character whose bytes are split is held back until it is whole
        assert model.tokenizer.decode(final.token_ids[:count]).startswith(out.text)
        assert out.text.endswith(out.delta_text) and final.text.startswith(out.text)
        assert list(out.logprobs) == final.logprobs[:count]
        if out.delta_token_ids:
            assert out.token_ids[-len(out.delta_token_ids) :] == out.delta_token_ids
    assert count == 9 and any(type(u.outputs.token_ids) is Prefix for u in seen[:-1])


def test_text_views_keep_what_they_held_and_join_once_per_read() -> None:
    text = Text()
    views = []
    for piece in ["Hel", "", "lo", " wor", "ld"]:
        text.append(piece)
        views.append(text.so_far())
    held = text.so_far("!?")  # with a tail: text held back after it
    assert [str(v) for v in reversed(views)] == ["Hello world", "Hello wor", "Hello", "Hel", "Hel"]
    assert str(views[2]) == "Hello" and str(held) == "Hello world!?" and str(text) == "Hello world"
    text.append("!")
    assert str(held) == "Hello world!?" and str(text.so_far()) == "Hello world!"
    # readers on other threads, each reading every view, all see the same texts
    pieces = [f"{i}," for i in range(2000)]
    shared, snapshots = Text(), []
    for piece in pieces:
        shared.append(piece)
        snapshots.append(shared.so_far())
    seen: list[list[str]] = [[], [], []]
    readers = [
        threading.Thread(target=lambda out=out: out.extend(str(v) for v in snapshots))
        for out in seen
    ]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    want = ["".join(pieces[: i + 1]) for i in range(len(pieces))]
    assert seen == [want, want, want]


def test_an_update_joins_its_text_when_read_and_a_merged_one_does_not() -> None:
    text = Text()
    text.append("ab")
    update = CompletionOutput(text.so_far(), [1], "ab", [1])
    text.append("cd")
    merged = with_delta(update, "abcd", [1, 2])
    assert type(merged.__dict__["_text"]) is TextSoFar  # not joined by the merge
    assert (merged.text, merged.delta_text, merged.delta_token_ids) == ("ab", "abcd", [1, 2])
    assert (update.text, update.delta_text, update.delta_token_ids) == ("ab", "ab", [1])
    assert type(update.__dict__["_text"]) is str  # joined once, on the first read
    assert update == CompletionOutput("ab", [1], "ab", [1]) and "text='ab'" in repr(update)
    assert copy.deepcopy(merged) == merged and CompletionOutput("x", [], "", []).text == "x"


def test_a_stop_string_matcher_holds_no_more_than_a_stop_string_beginning() -> None:
    """What it searches each time is the text held back and the new text, whatever the
    length of the output; its text is the same as before."""
    matcher = StopStringMatcher(["\n\nUser:", "END"])
    released = []
    for i in range(3000):
        released.append(matcher.feed(f"word {i}\n"))
        assert len(matcher._held) < len("\n\nUser:")
    released.append(matcher.feed("\n\nUse"))
    assert matcher._held == "\n\nUse"
    released.append(matcher.feed("r: more"))
    assert matcher.matched == "\n\nUser:" and matcher.feed("after") == ""
    assert "".join(released) == matcher.text == "".join(f"word {i}\n" for i in range(3000))
