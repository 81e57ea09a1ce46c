"""``stream_interval``: streamed updates after the first carry that many tokens, merged, and
the streams still carry exactly what the same call without streaming returns."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from auto_glm.engine.outputs import CompletionOutput, RequestOutput
from auto_glm.serving.config import ConfigError, load_config
from auto_glm.serving.generation import _Merged
from tests.serving.conftest import Served, start_service, stop_service


def _updates(count: int) -> list[RequestOutput]:
    """``count`` one-token updates of one request, the last one finished."""
    out = []
    for i in range(count):
        text = "".join(f"t{j} " for j in range(i + 1))
        completion = CompletionOutput(
            text=text,
            token_ids=list(range(i + 1)),
            delta_text=f"t{i} ",
            delta_token_ids=[i],
            finish_reason="length" if i == count - 1 else None,
        )
        out.append(RequestOutput("r", [1, 2], completion, finished=i == count - 1))
    return out


@pytest.mark.parametrize("interval", [2, 4, 7])
def test_updates_merge_to_the_interval_and_lose_nothing(interval: int) -> None:
    merged, sent = _Merged(interval), []
    for update in _updates(18):
        if (out := merged.add(update)) is not None:
            sent.append(out)
    sizes = [len(u.outputs.delta_token_ids) for u in sent]
    # the first at once, then `interval` at a time, the last as soon as it comes
    rest = 17 % interval
    assert sizes == [1] + [interval] * (17 // interval) + ([rest] if rest else [])
    assert "".join(u.outputs.delta_text for u in sent) == sent[-1].outputs.text
    assert [i for u in sent for i in u.outputs.delta_token_ids] == list(range(18))
    assert sent[-1].finished and not any(u.finished for u in sent[:-1])
    assert merged.release() is None


def test_an_error_first_releases_what_is_held() -> None:
    merged = _Merged(4)
    first, second, _ = _updates(3)
    assert merged.add(first) is first
    assert merged.add(second) is None
    held = merged.release()
    assert held.outputs.delta_token_ids == [1] and held.outputs.text == second.outputs.text
    assert merged.release() is None


def test_a_stream_interval_below_1_is_refused_with_the_setting_named() -> None:
    with pytest.raises(ConfigError, match="stream_interval"):
        load_config(overrides={"stream_interval": 0}, environ={})


@pytest.fixture(scope="module")
def every_4(tiny_checkpoint) -> Iterator[Served]:
    served, thread = start_service(tiny_checkpoint, max_num_seqs=4, stream_interval=4)
    yield served
    stop_service(served, thread)


@pytest.mark.integration
def test_streams_every_4_tokens_carry_the_whole_reply(every_4: Served) -> None:
    client = every_4.openai()
    options = {"model": every_4.name, "max_tokens": 18, "temperature": 0}
    options |= {"extra_body": {"ignore_eos": True}}
    prompt = "Stream in fours"
    whole = client.completions.create(**options, prompt=prompt, logprobs=1).choices[0]
    text, sizes, tokens = "", [], []
    for chunk in client.completions.create(**options, prompt=prompt, logprobs=1, stream=True):
        for choice in chunk.choices:
            text += choice.text
            sizes.append(len(choice.logprobs.tokens))
            tokens += choice.logprobs.tokens
    assert text == whole.text and tokens == whole.logprobs.tokens
    assert sizes == [1, 4, 4, 4, 4, 1]  # the first token at once, the last as it came

    messages = [{"role": "user", "content": prompt}]
    reply = client.chat.completions.create(**options, messages=messages).choices[0]
    content, events = "", 0
    for chunk in client.chat.completions.create(**options, messages=messages, stream=True):
        for choice in chunk.choices:
            if choice.delta.content:
                content += choice.delta.content
                events += 1
    assert content == reply.message.content and 2 <= events <= 6
