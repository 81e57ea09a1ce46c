"""Streams carry what the same call without streaming returns: logprobs, choice indexes of
several prompts, and stop strings per choice, through the official ``openai`` client."""

from __future__ import annotations

import pytest

from tests.serving.conftest import Served

pytestmark = pytest.mark.integration
MESSAGES = [{"role": "user", "content": "Stream your logprobs"}]


def test_streamed_chat_logprobs_equal_the_whole_reply(served: Served) -> None:
    client = served.openai()
    options = {
        "model": served.name,
        "messages": MESSAGES,
        "max_tokens": 8,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
    }
    whole = client.chat.completions.create(**options).choices[0].logprobs.content
    entries, usage = [], None
    for chunk in client.chat.completions.create(
        **options, stream=True, stream_options={"include_usage": True}
    ):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            if choice.logprobs is not None:
                entries.extend(choice.logprobs.content)
    assert len(entries) == usage.completion_tokens == 8  # one entry per token, none lost
    assert [e.token for e in entries] == [e.token for e in whole]
    assert [e.bytes for e in entries] == [e.bytes for e in whole]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in whole], abs=1e-5)
    for streamed, expected in zip(entries, whole, strict=True):
        assert [t.token for t in streamed.top_logprobs] == [t.token for t in expected.top_logprobs]
        assert len(streamed.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert streamed.logprob == pytest.approx(streamed.top_logprobs[0].logprob, abs=1e-5)


def _greedy_completion(served: Served, logprobs: int) -> dict:
    """A completion's options: 8 greedy tokens of one prompt, with ``logprobs``."""
    return {
        "model": served.name,
        "prompt": "Stream your logprobs",
        "max_tokens": 8,
        "temperature": 0,
        "logprobs": logprobs,
    }


def test_streamed_completion_logprobs_equal_the_whole_reply(served: Served) -> None:
    client = served.openai()
    options = _greedy_completion(served, logprobs=2)
    whole = client.completions.create(**options).choices[0]
    text, tokens, token_logprobs, top_logprobs, offsets = "", [], [], [], []
    for chunk in client.completions.create(**options, stream=True):
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                token_logprobs += choice.logprobs.token_logprobs
                top_logprobs += choice.logprobs.top_logprobs
                offsets += choice.logprobs.text_offset
    assert text == whole.text
    assert len(tokens) == 8
    assert tokens == whole.logprobs.tokens
    assert token_logprobs == pytest.approx(whole.logprobs.token_logprobs, abs=1e-5)
    assert [list(t) for t in top_logprobs] == [list(t) for t in whole.logprobs.top_logprobs]
    assert all(len(t) <= 2 for t in top_logprobs)
    # each offset is where its token's text starts in the completion's text
    _assert_offsets_point_at_tokens(text, tokens, offsets)


def test_streamed_offsets_stay_right_while_a_stop_string_beginning_is_held(
    served: Served,
) -> None:
    """A token whose text may begin a stop string is held back, then released with the next
    one: the offsets of both still point at their own text."""
    client = served.openai()
    options = _greedy_completion(served, logprobs=0)
    whole = client.completions.create(**options).choices[0].logprobs
    # the first token with text of its own, not the last: the stop string starts with it
    held = next(
        i for i, t in enumerate(whole.tokens[:-1]) if t.strip() and "\ufffd" not in t and i > 0
    )
    stop = whole.tokens[held] + "\x00"  # never completed
    text, tokens, offsets, chunks = "", [], [], []
    for chunk in client.completions.create(**options, stop=[stop], stream=True):
        for choice in chunk.choices:
            chunks.append(choice.text)
            text += choice.text
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                offsets += choice.logprobs.text_offset
    assert "" in chunks[1:-1]  # the token's text was held back at first
    assert tokens == whole.tokens and offsets == whole.text_offset
    _assert_offsets_point_at_tokens(text, tokens, offsets)


def _assert_offsets_point_at_tokens(text: str, tokens: list[str], offsets: list[int]) -> None:
    assert len(offsets) == len(tokens) and offsets[0] == 0
    assert offsets == sorted(offsets) and offsets[-1] < len(text)
    for token, offset in zip(tokens, offsets, strict=True):
        if "\ufffd" not in token:  # a token holding part of a character has no text of its own
            assert text[offset : offset + len(token)] == token, (text, tokens, offsets)


def test_completion_logprobs_offsets_point_at_tokens_without_streaming(served: Served) -> None:
    whole = (
        served.openai()
        .completions.create(
            model=served.name,
            prompt="Stream your logprobs",  # its greedy reply starts with a split character
            max_tokens=8,
            temperature=0,
            logprobs=2,
        )
        .choices[0]
    )
    assert any("\ufffd" in t for t in whole.logprobs.tokens)  # a character split in two
    _assert_offsets_point_at_tokens(whole.text, whole.logprobs.tokens, whole.logprobs.text_offset)


def test_streamed_prompts_and_choices_keep_their_indexes(served: Served) -> None:
    """Two prompts x n=2: choice index = prompt index x n + choice, as without streaming."""
    client = served.openai()
    prompts = ["First prompt", "Second prompt, longer"]
    options = {"model": served.name, "max_tokens": 6, "temperature": 1.0, "seed": 5, "n": 2}
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in client.completions.create(
        **options, prompt=prompts, stream=True, stream_options={"include_usage": True}
    ):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                assert choice.index not in finish, "a choice finished twice"
                finish[choice.index] = choice.finish_reason
    assert finish == dict.fromkeys(range(4), "length")
    # each prompt alone gives its two choices (seed + choice), at indexes 0 and 1
    alone = [
        [
            c.text
            for c in sorted(
                client.completions.create(**options, prompt=p).choices, key=lambda c: c.index
            )
        ]
        for p in prompts
    ]
    assert [texts[i] for i in range(4)] == alone[0] + alone[1]
    assert len(set(texts.values())) == 4  # seeds differ per choice, prompts differ
    prompt_tokens = sum(len(served.model.tokenizer.encode(p)) for p in prompts)
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, 4 * 6)


def test_streamed_stop_strings_end_each_choice_on_its_own(served: Served) -> None:
    """n=3 with stop strings: each choice stops at its own first stop string, or runs on."""
    client = served.openai()
    options = {"model": served.name, "prompt": "Stop, choices", "temperature": 1.0, "seed": 21}
    full = [
        c.text
        for c in sorted(
            client.completions.create(
                **options, n=3, max_tokens=24, extra_body={"ignore_eos": True}
            ).choices,
            key=lambda c: c.index,
        )
    ]

    def ascii_pair(text: str) -> str:  # a two-character stop from the middle of a text
        middle = len(text) // 2
        return next(
            text[i : i + 2]
            for i in [*range(middle, len(text) - 1), *range(middle)]
            if text[i : i + 2].isascii() and text[i : i + 2].strip()
        )

    stops = [ascii_pair(full[0]), ascii_pair(full[1])]
    expected = {}
    for index, text in enumerate(full):
        found = [text.index(s) for s in stops if s in text]
        expected[index] = (text[: min(found)], "stop") if found else (text, "length")
    assert expected[0][1] == expected[1][1] == "stop"

    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in client.completions.create(
        **options,
        n=3,
        max_tokens=24,
        stop=stops,
        stream=True,
        extra_body={"ignore_eos": True},
    ):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert {i: (texts.get(i, ""), finish.get(i)) for i in range(3)} == expected
