"""Incremental detokenization and stop strings with a byte-level BPE trained in the test."""

from __future__ import annotations

import random

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


def byte_level(lines: list[str], special_tokens: list[str], **kwargs) -> PreTrainedTokenizerFast:
    """A byte-level BPE of at most 320 tokens trained on ``lines``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        show_progress=False,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    # trained on English only, so Chinese characters and emoji stay split into byte tokens
    lines = [
        "Hello world, this is a small test.",
        "User: hi\n\nAssistant: hello there",
        "the end of the story is near",
    ] * 4
    special = ["<|endoftext|>", "<|user|>"]
    return byte_level(lines, special, eos_token=special[0], additional_special_tokens=special[1:])


@pytest.fixture(scope="module")
def metaspace() -> PreTrainedTokenizerFast:
    """A sentencepiece-style tokenizer: a word's leading space is part of its token and is
    dropped at the start of a decoded text, so a token's text depends on what precedes it."""
    lines = ["Hello world, this is a small test.", "User: hi there", "the end is near"] * 4
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=200, show_progress=False, special_tokens=["<unk>", "<|user|>"]
    )
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", additional_special_tokens=["<|user|>"]
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
    assert "".join(stream(IncrementalDetokenizer(tokenizer), ids)) == skipped  # the default
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


class Recording:
    """A ``DecodeStream`` that records the ids it is fed, and raises on its ``fail_at``-th
    step as one whose prefix check failed would."""

    def __init__(self, inner, fail_at: int | None = None) -> None:
        self.inner, self.fail_at, self.fed, self.steps = inner, fail_at, [], 0

    def step(self, backend, ids: list[int]) -> str | None:
        self.steps += 1
        if self.steps == self.fail_at:
            raise Exception("Invalid prefix encountered")
        self.fed += ids
        return self.inner.step(backend, ids)


def in_python(detok: IncrementalDetokenizer) -> IncrementalDetokenizer:
    """``detok`` decoding in Python only, as for a tokenizer without ``DecodeStream``."""
    detok._stream = None
    return detok


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_ids_that_show_no_text_never_widen_the_window(
    tokenizer: PreTrainedTokenizerFast, skip_special_tokens: bool
) -> None:
    """A model's padded vocabulary can sample ids the tokenizer has no token for (a random
    model mostly does), and a request that ignores EOS can sample it again and again: long
    runs of them between two words must cost no more to decode than the words alone."""
    eos = tokenizer.eos_token_id
    past = len(tokenizer) + 7  # in the model's padded vocabulary only
    words = encode(tokenizer, "Hello world, 你好 the end")
    ids = []
    for i, word in enumerate(words):
        ids += [word, *([past, eos, past + 1] * 40 if i % 2 else [past] * 60)]
    detok = IncrementalDetokenizer(
        tokenizer,
        skip_special_tokens=skip_special_tokens,
        prompt_token_ids=words[:3],
        spaces_between_special_tokens=False,  # as the fast tokenizer's decode
    )
    twin = in_python(
        IncrementalDetokenizer(
            tokenizer, skip_special_tokens, words[:3], spaces_between_special_tokens=False
        )
    )
    detok._stream = fed = Recording(detok._stream)
    decoded: list[int] = []
    decode = twin._decode_ids
    twin._decode_ids = lambda run: decoded.append(len(run)) or decode(run)
    shown = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    for each in (detok, twin):
        deltas = stream(each, ids) + [each.step([], flush=True)]
        assert "".join(deltas) == shown
        assert each.token_ids == ids  # every sampled id is still the request's
    assert ("<|endoftext|>" in shown) is not skip_special_tokens
    # in Python, each decode covers the prompt context and the last token, or the bytes of a
    # character split across tokens, never a run of ids that show nothing (before they were
    # left out of the window, decodes of 68 ids with EOS kept and of 546 with it skipped);
    # DecodeStream is fed none of them
    assert max(decoded) <= 3 + 4
    assert fed.fed == [
        i for i in ids if i < len(tokenizer) and (i != eos or not skip_special_tokens)
    ]


def test_tokens_added_to_the_tokenizer_later_show_their_text() -> None:
    """The ids past the vocabulary are read once per tokenizer, and again once it grows."""
    tokenizer = byte_level(["hello there"] * 4, [])  # its own: tokens are added to it
    hello = encode(tokenizer, "hello")
    assert "".join(stream(IncrementalDetokenizer(tokenizer), hello)) == "hello"
    tokenizer.add_tokens(["<tool_call>"])
    added = tokenizer.convert_tokens_to_ids("<tool_call>")
    assert added >= len(tokenizer) - 1  # a new id, past the vocabulary read before
    text = "".join(stream(IncrementalDetokenizer(tokenizer), [*hello, added]))
    assert text == "hello<tool_call>"


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
    assert processor.output_ids == ids  # every sampled id is kept
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


def test_prompt_context_keeps_the_leading_space(metaspace: PreTrainedTokenizerFast) -> None:
    prompt, out = encode(metaspace, "User: hi"), encode(metaspace, " there is")
    assert metaspace.decode(out) == "there is"  # alone, the first space is dropped
    assert len(prompt) < 6  # shorter than the context kept: all of it is context
    detok = IncrementalDetokenizer(metaspace, prompt_token_ids=prompt)
    assert stream(detok, out) == [" there", " is"]
    processor = RequestOutputProcessor(metaspace, SamplingParams(), prompt_token_ids=prompt)
    assert "".join(processor.process([i]).delta_text for i in out) == " there is"


def test_skipped_special_token_keeps_the_next_space(metaspace: PreTrainedTokenizerFast) -> None:
    ids = encode(metaspace, "User: hi<|user|> there<|user|>is")
    assert metaspace.convert_tokens_to_ids("<|user|>") in ids
    assert stream(IncrementalDetokenizer(metaspace), ids) == [
        "User:",
        " hi",
        "",
        " there",
        "",
        " is",
    ]


def test_no_clean_up_of_tokenization_spaces() -> None:
    # a WordPiece tokenizer that cleans up by default (" ." -> "."; transformers skips the
    # clean-up for BPE) must still stream the raw text, or deltas would not concatenate
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(cleanup=False)
    trainer = trainers.WordPieceTrainer(
        vocab_size=60, show_progress=False, special_tokens=["[UNK]"]
    )
    tok.train_from_iterator(["hello , world . it 's done"] * 3, trainer)
    cleaning = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", clean_up_tokenization_spaces=True
    )
    ids = encode(cleaning, "hello , world . it 's")
    assert cleaning.decode(ids) == "hello, world. it's"  # the clean-up is really on
    assert stream(IncrementalDetokenizer(cleaning), ids) == [
        "hello",
        " ,",
        " world",
        " .",
        " it",
        " '",
        " s",
    ]


def test_empty_stop_string_is_refused() -> None:
    with pytest.raises(ValueError) as caught:
        StopStringMatcher(["ok", ""])
    assert str(caught.value) == "stop strings must be non-empty: drop the empty ones"


def test_stop_string_at_the_very_start_or_twice_in_one_delta() -> None:
    matcher = StopStringMatcher(["Hi"])
    assert matcher.feed("Hi there") == "" and matcher.matched == "Hi" and matcher.text == ""
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("aSTOPbSTOPc") == "a" and matcher.text == "a"


def test_processor_flushes_a_split_character_when_finished(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    ids = encode(tokenizer, "ok 你")
    processor = RequestOutputProcessor(tokenizer, SamplingParams())
    assert "".join(processor.process([i]).delta_text for i in ids[:-1]) == "ok "
    assert processor.process([], finished=True) == ("\ufffd", False)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_stream_gives_the_deltas_of_the_python_window(
    tokenizer: PreTrainedTokenizerFast,
    metaspace: PreTrainedTokenizerFast,
    chunk: int,
    skip_special_tokens: bool,
) -> None:
    """A fast tokenizer's window is kept by ``tokenizers``' DecodeStream: delta for delta,
    the same text as the window decoded in Python, with split characters, invalid bytes,
    special tokens, a prompt's context and a flushed last character."""
    lead = encode(tokenizer, "你")[0]
    cases = [
        (tokenizer, encode(tokenizer, "User: hi\n\n"), encode(tokenizer, MIXED * 2)),
        (tokenizer, [], [lead] * 3 + encode(tokenizer, "ok <|user|> 你好<|endoftext|>你")[:-1]),
        # a prompt that ends mid-character: its text is not the output's
        (tokenizer, encode(tokenizer, "hi ") + [lead], encode(tokenizer, "ok 你好")),
        (metaspace, encode(metaspace, "User: hi"), encode(metaspace, " there<|user|> is")),
    ]
    for tok, prompt, out in cases:
        rust = IncrementalDetokenizer(tok, skip_special_tokens, prompt, False)
        python = in_python(IncrementalDetokenizer(tok, skip_special_tokens, prompt, False))
        assert (rust._stream is None) is tok.decode(prompt).endswith("\ufffd")
        deltas = stream(rust, out, chunk) + [rust.step([], flush=True)]
        assert deltas == stream(python, out, chunk) + [python.step([], flush=True)]
        shown = tok.decode(prompt + out, skip_special_tokens=skip_special_tokens)
        assert (
            "".join(deltas)
            == shown[len(tok.decode(prompt, skip_special_tokens=skip_special_tokens)) :]
        )


def test_an_error_of_decode_stream_goes_on_in_python(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = encode(tokenizer, MIXED)
    detok = IncrementalDetokenizer(tokenizer)
    detok._stream = failing = Recording(detok._stream, fail_at=9)
    deltas = stream(detok, ids)
    assert "".join(deltas) == MIXED and failing.steps == 9 and detok._stream is None
    assert deltas == stream(in_python(IncrementalDetokenizer(tokenizer)), ids)


def test_without_decode_stream_or_with_spaced_special_tokens_python_decodes(
    tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``tokenizers`` before 0.22 has no ``DecodeStream(ids=...)``, and the spaces between
    special tokens are this class's own: both decode in Python."""
    spaced = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    assert spaced._stream is None and spaced._special
    ids = encode(tokenizer, "<|user|><|endoftext|> ok")
    assert "".join(stream(spaced, ids)) == "<|user|> <|endoftext|> ok"

    class OldDecodeStream:
        def __init__(self, skip_special_tokens: bool = False) -> None:
            pass

    monkeypatch.setattr(decoders, "DecodeStream", OldDecodeStream)
    old = IncrementalDetokenizer(tokenizer)
    assert old._stream is None
    assert "".join(stream(old, encode(tokenizer, MIXED))) == MIXED


def test_a_skipped_stop_token_ends_the_stream(tokenizer: PreTrainedTokenizerFast) -> None:
    """After the stop token that ended a request, a late token (a step planned ahead) is
    decoded in Python from after it, whose text never shows."""
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    ids = encode(tokenizer, "hi there")
    assert "".join(stream(detok, ids)) == "hi there"
    detok.skip(tokenizer.eos_token_id)
    assert detok._stream is None
    assert detok.step(encode(tokenizer, " more")) == " more"


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_stream_and_python_agree_on_random_ids(
    tokenizer: PreTrainedTokenizerFast, skip_special_tokens: bool
) -> None:
    """Random ids (byte tokens among them, so characters split, stay invalid or complete
    late; special tokens; ids past the vocabulary) after random prompts, fed in random
    chunks: DecodeStream's deltas are the Python window's, one for one."""
    rng = random.Random(5)
    vocab = len(tokenizer)
    in_rust = 0
    for _ in range(150):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 9))]
        out = [rng.randrange(vocab + 3) for _ in range(rng.randrange(1, 50))]
        rust = IncrementalDetokenizer(tokenizer, skip_special_tokens, prompt, False)
        python = in_python(IncrementalDetokenizer(tokenizer, skip_special_tokens, prompt, False))
        in_rust += rust._stream is not None
        deltas: dict[str, list[str]] = {"rust": [], "python": []}
        at = 0
        while at < len(out):
            size = rng.randrange(1, 4)
            for name, each in (("rust", rust), ("python", python)):
                deltas[name].append(each.step(out[at : at + size]))
            at += size
        for name, each in (("rust", rust), ("python", python)):
            deltas[name].append(each.step([], flush=True))
        assert deltas["rust"] == deltas["python"], (prompt, out)
    assert in_rust >= 75  # those whose prompt does not end mid-character (97 of 150)
