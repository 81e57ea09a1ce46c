"""Incremental detokenization and stop strings with a byte-level BPE trained in the test."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from auto_glm.engine.output_processor import (
    IncrementalDetokenizer,
    RequestOutputProcessor,
    StopStringMatcher,
)
from auto_glm.sampling_params import SamplingParams

MIXED = "Hello world! 你好，世界 😀🎉 the end"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    # trained on English only, so Chinese characters and emoji stay split into byte tokens
    lines = [
        "Hello world, this is a small test.",
        "User: hi\n\nAssistant: hello there",
        "the end of the story is near",
    ] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        show_progress=False,
        special_tokens=["<|endoftext|>", "<|user|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", additional_special_tokens=["<|user|>"]
    )


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1) -> list[str]:
    return [detok.step(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]


def test_split_characters_are_held_back(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = encode(tokenizer, MIXED)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # the test really splits
    deltas = stream(IncrementalDetokenizer(tokenizer), ids)
    assert "".join(deltas) == tokenizer.decode(ids) == MIXED
    assert "" in deltas and not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("chunk", [2, 3, 7])
def test_chunks_concatenate_to_the_full_decode(
    tokenizer: PreTrainedTokenizerFast, chunk: int
) -> None:
    ids = encode(tokenizer, MIXED * 3)
    assert "".join(stream(IncrementalDetokenizer(tokenizer), ids, chunk)) == MIXED * 3


def test_special_tokens_skipped_or_kept(tokenizer: PreTrainedTokenizerFast) -> None:
    text = "<|user|> hi 你好<|endoftext|>"
    ids = encode(tokenizer, text)
    assert tokenizer.convert_tokens_to_ids("<|user|>") in ids
    skipped = "".join(stream(IncrementalDetokenizer(tokenizer, skip_special_tokens=True), ids))
    assert skipped == tokenizer.decode(ids, skip_special_tokens=True) == " hi 你好"
    kept = "".join(stream(IncrementalDetokenizer(tokenizer, skip_special_tokens=False), ids))
    assert kept == text


def test_flush_releases_an_incomplete_character(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = encode(tokenizer, "ok 你")
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(stream(detok, ids[:-1])) == "ok "
    assert detok.step([], flush=True) == "\ufffd"  # what a full decode shows, too
    assert detok.token_ids == ids[:-1]


def test_prompt_context_does_not_leak_into_the_output(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    prompt, out = encode(tokenizer, "User: hi\n\n"), encode(tokenizer, "Assistant: 你好 there")
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=prompt)
    full = tokenizer.decode(prompt + out)
    assert "".join(stream(detok, out)) == full[len(tokenizer.decode(prompt)) :]
    assert detok.token_ids == out


def feed_text(matcher: StopStringMatcher, pieces: list[str]) -> list[str]:
    return [matcher.feed(p) for p in pieces]


def test_stop_string_cuts_before_it() -> None:
    matcher = StopStringMatcher(["world"])
    assert "".join(feed_text(matcher, ["Hello wo", "rld and more"])) == "Hello "
    assert matcher.text == "Hello " and matcher.matched == "world"
    assert matcher.feed("later") == ""


def test_partial_stop_is_held_then_released() -> None:
    matcher = StopStringMatcher(["\n\nUser"])
    assert feed_text(matcher, ["Hi there\n", "\nUs"]) == ["Hi there", ""]
    assert matcher.feed("ing it") == "\n\nUsing it"  # not the stop string after all
    assert matcher.feed("\n\nU") == ""
    assert matcher.feed("", final=True) == "\n\nU"  # the request ended: flush
    assert matcher.matched is None


def test_earliest_of_several_stops_wins() -> None:
    matcher = StopStringMatcher(["cd", "bcdX", "b"])
    assert matcher.feed("abcd") == "a" and matcher.matched == "b"
    matcher = StopStringMatcher(["xyz", "yz!"])
    assert feed_text(matcher, ["wx", "y", "z!"]) == ["w", "", ""]
    assert matcher.matched == "xyz"


def test_no_stop_strings_passes_text_through() -> None:
    matcher = StopStringMatcher([])
    assert feed_text(matcher, ["a", "b\n"]) == ["a", "b\n"]


def run(processor: RequestOutputProcessor, ids: list[int]) -> tuple[str, list[bool]]:
    results = [processor.process([i]) for i in ids]
    return "".join(r.delta_text for r in results), [r.stop_matched for r in results]


def test_processor_stops_on_a_stop_string(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = encode(tokenizer, "Hello 你好\n\nUser: hi again")
    processor = RequestOutputProcessor(tokenizer, SamplingParams(stop=["\n\nUser"]))
    text, flags = run(processor, ids)
    assert text == processor.text == "Hello 你好"
    assert flags[-1] and flags.count(False) == flags.index(True)  # stays set once matched
    assert processor.token_ids == ids  # every sampled id is kept
    assert processor.process([], finished=True) == ("", True)


def test_processor_flushes_held_text_when_finished(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = encode(tokenizer, "Hello world\n\nUs")
    processor = RequestOutputProcessor(tokenizer, SamplingParams(stop=["\n\nUser"]))
    text, flags = run(processor, ids)
    assert text == "Hello world" and not any(flags)
    assert processor.process([], finished=True) == ("\n\nUs", False)
    assert processor.text == "Hello world\n\nUs"


def test_invalid_bytes_do_not_stall_the_stream(tokenizer: PreTrainedTokenizerFast) -> None:
    lead = encode(tokenizer, "你")[0]  # a lead byte that never gets its continuation bytes
    ids = [lead] * 5 + encode(tokenizer, "ok")
    deltas = stream(IncrementalDetokenizer(tokenizer), ids)
    assert "".join(deltas) == tokenizer.decode(ids)
    # invalid bytes are held only while they end the text: the next token releases them
    assert deltas[:5] == [""] * 5 and deltas[5].startswith("\ufffd" * 5)
