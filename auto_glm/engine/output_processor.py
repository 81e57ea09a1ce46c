"""Per-request detokenization and stop strings, run outside the engine's step loop.

The engine only produces token ids. Each request's consumer (an API handler, a stream)
feeds them to its own ``RequestOutputProcessor``, which turns them into text deltas and
tells the engine to finish the request when a stop string appears. One instance belongs
to one consumer: it is not shared between threads.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from auto_glm.sampling_params import SamplingParams

if TYPE_CHECKING:  # only for hints: importing transformers is slow
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "IncrementalDetokenizer",
    "ProcessedOutput",
    "RequestOutputProcessor",
    "StopStringMatcher",
]

# Prompt tokens decoded before the first output token, so that tokenizers whose text
# depends on the left context (sentencepiece's leading spaces) decode it as in the full text.
_PROMPT_CONTEXT = 6


class _Decoding(NamedTuple):
    """How one tokenizer decodes: ``decode(ids) -> text``, and which ids show no text
    whatever surrounds them, those it drops before its decoder runs: ids from
    ``vocab_end`` up (None where that is not known) and those in ``skipped``."""

    decode: Callable[[list[int]], str]
    vocab_end: int | None  # ids from here up have no token
    skipped: frozenset[int]  # special ids dropped by this decode


# per tokenizer: (its size, vocabulary end, special added ids) of its Rust backend, read
# again only if tokens were added since
_BACKEND_IDS: weakref.WeakKeyDictionary[Any, tuple[int, int, frozenset[int]]] = (
    weakref.WeakKeyDictionary()
)


def _decoding(tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool) -> _Decoding:
    """``decode`` is ``tokenizer.decode(ids, skip_special_tokens=..., clean_up_tokenization_
    spaces=False)``; for a fast tokenizer whose class keeps transformers' own ``decode``, the
    Rust tokenizer's ``decode`` called directly, which is all that one does (a third of the
    time per call: it runs twice per output token). Only then are the silent ids known: the
    Rust decoder filters them out before it decodes, so dropping them changes no text."""
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    cls = type(tokenizer)
    if not (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        and cls._decode is PreTrainedTokenizerFast._decode
        and cls.decode is PreTrainedTokenizerBase.decode
    ):
        decode = functools.partial(
            tokenizer.decode,
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )
        return _Decoding(decode, None, frozenset())
    backend = tokenizer.backend_tokenizer
    size = backend.get_vocab_size(with_added_tokens=True)
    known = _BACKEND_IDS.get(tokenizer)
    if known is None or known[0] != size:
        vocab = backend.get_vocab(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()
        special = frozenset(i for i, token in added.items() if token.special)
        known = _BACKEND_IDS[tokenizer] = (size, max(vocab.values(), default=-1) + 1, special)
    decode = functools.partial(backend.decode, skip_special_tokens=skip_special_tokens)
    return _Decoding(decode, known[1], known[2] if skip_special_tokens else frozenset())


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas in O(1) work per token.

    It keeps a window ``ids[prefix:]``: the text of ``ids[prefix:read]`` was already
    emitted, so decoding the window and dropping that text's length yields the new text.
    Text ending in U+FFFD is a character whose bytes are split across tokens: it is held
    until the next token completes it (or the request ends). The deltas concatenate to
    ``tokenizer.decode(ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)``.

    Ids that decode to nothing whatever surrounds them (a fast tokenizer's ids past its
    vocabulary, which a model's padded vocabulary can sample, and skipped special tokens)
    never enter the window: a run of them would otherwise keep it from moving on, and each
    token would decode the whole run twice.

    ``spaces_between_special_tokens`` (with special tokens kept) puts a space between two
    adjacent special tokens, as slow tokenizers did; transformers' own ``decode`` ignores
    that option (fast tokenizers never add the space), so it is applied here.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        skip_special_tokens: bool = True,
        prompt_token_ids: list[int] | None = None,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        decoding = _decoding(tokenizer, skip_special_tokens)
        self._decode_ids = decoding.decode
        self._vocab_end, self._skipped = decoding.vocab_end, decoding.skipped
        self._special: frozenset[int] = frozenset()  # ids spaced apart; empty: no spacing
        if spaces_between_special_tokens and not skip_special_tokens:
            decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
            self._special = frozenset(tokenizer.all_special_ids) | {
                i for i, token in decoder.items() if token.special
            }
        context = list(prompt_token_ids or [])[-_PROMPT_CONTEXT:]
        self._num_context = len(context)
        self._out: list[int] = []  # every output id
        self._ids: list[int] = context  # prompt context, then the output ids that show text
        self._prefix = 0  # window start: a few tokens before the unread ones, for context
        self._read = len(context)  # first token whose text is not emitted yet

    @property
    def token_ids(self) -> list[int]:
        """Every output token id fed so far: the detokenizer's own list, which later tokens
        extend (do not change it)."""
        return self._out

    def _decode(self, start: int, end: int) -> str:
        """Text of ``self._ids[start:end]`` with a space between two special output tokens
        (only called with ``_special`` set)."""
        # no space clean-up: it rewrites text across window edges and would break the
        # guarantee that deltas concatenate to the full decode
        ids, runs = self._ids, []
        for i in range(max(start, self._num_context) + 1, end):
            if ids[i - 1] in self._special and ids[i] in self._special:
                runs.append(ids[start:i])
                start = i
        runs.append(ids[start:end])
        return " ".join(self._decode_ids(run) for run in runs)

    def skip(self, token_id: int) -> None:
        """Record a last token whose text is never shown: the stop token that ended the
        request (visible only with ``skip_special_tokens=False``, and never wanted)."""
        self._out.append(token_id)
        self._ids.append(token_id)
        self._prefix = self._read = len(self._ids)

    def step(self, new_token_ids: list[int], flush: bool = False) -> str:
        """Add output tokens and return the text they complete; ``flush`` (the request
        ended) also returns an incomplete character's replacement text."""
        self._out += new_token_ids
        ids, end = self._ids, self._vocab_end
        if end is None:
            ids += new_token_ids
        else:  # runs once per output token: a loop, not a comprehension
            skipped = self._skipped
            for token_id in new_token_ids:
                if token_id < end and token_id not in skipped:
                    ids.append(token_id)
        prefix, read, length = self._prefix, self._read, len(ids)
        if read == length:
            return ""
        if self._special:
            emitted, window = self._decode(prefix, read), self._decode(prefix, length)
        else:
            decode = self._decode_ids
            emitted, window = decode(ids[prefix:read]), decode(ids[prefix:])
        if len(window) <= len(emitted) or (window.endswith("\ufffd") and not flush):
            return ""  # nothing visible yet (special token kept silent) or a split character
        self._prefix, self._read = read, length
        return window[len(emitted) :]


class StopStringMatcher:
    """Finds the first stop string in streamed text and holds back possible beginnings.

    ``feed`` returns the text that is safe to emit. Text that could be the start of a stop
    string (the output ends with "\\n\\nUs" and a stop is "\\n\\nUser") is held until the
    next text settles it, or until ``feed(..., final=True)`` releases it.
    """

    def __init__(self, stop: list[str]) -> None:
        if not all(stop):
            raise ValueError("stop strings must be non-empty: drop the empty ones")
        self.stop = list(stop)
        self._longest = max((len(s) for s in stop), default=0)
        self.text = ""  # all text so far, cut before the stop string once one matched
        self._emitted = 0  # length of the prefix of ``text`` already returned
        self.matched: str | None = None

    def feed(self, delta: str, final: bool = False) -> str:
        if self.matched is not None:
            return ""  # text after a stop string is dropped
        if not self.stop:  # nothing to find, nothing to hold back
            self.text += delta
            self._emitted = len(self.text)
            return delta
        # a match must end inside the new text, so it starts at most len(stop)-1 before it
        start = max(self._emitted, len(self.text) - self._longest + 1)
        self.text += delta
        found = [(pos, s) for s in self.stop if (pos := self.text.find(s, start)) >= 0]
        if found:
            pos, self.matched = min(found)
            self.text = self.text[:pos]
            return self._release(len(self.text))
        if final:
            return self._release(len(self.text))
        return self._release(len(self.text) - self._held_back())

    def _held_back(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _release(self, end: int) -> str:
        end = max(end, self._emitted)
        out = self.text[self._emitted : end]
        self._emitted = end
        return out


class ProcessedOutput(NamedTuple):
    delta_text: str  # new text that can be shown to the user
    stop_matched: bool  # a stop string appeared: finish the request with FinishReason.STOP


class RequestOutputProcessor:
    """Detokenizer plus stop strings for one request; needs no engine."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        sampling_params: SamplingParams,
        prompt_token_ids: list[int] | None = None,
    ) -> None:
        self.detokenizer = IncrementalDetokenizer(
            tokenizer,
            sampling_params.skip_special_tokens,
            prompt_token_ids,
            sampling_params.spaces_between_special_tokens,
        )
        self.stops = StopStringMatcher(sampling_params.stop)

    @property
    def text(self) -> str:
        """The output text so far (cut before the stop string once one matched)."""
        return self.stops.text

    @property
    def output_ids(self) -> list[int]:
        """Every output token id, including any sampled after a stop string: the
        detokenizer's own list, which later tokens extend (do not change it)."""
        return self.detokenizer.token_ids

    @property
    def stop_matched(self) -> bool:
        return self.stops.matched is not None

    def process(
        self, new_token_ids: list[int], finished: bool = False, stop_token: bool = False
    ) -> ProcessedOutput:
        """Feed the tokens sampled since the last call. ``finished``: the request ended for
        another reason, so held-back text is released; ``stop_token``: the last new token
        is the end-of-sequence or stop token that ended it, whose text is left out. Once a
        stop string matched, later calls return no text and ``stop_matched`` stays true."""
        shown = new_token_ids[:-1] if stop_token else new_token_ids
        delta = self.detokenizer.step(shown, flush=finished)
        if stop_token:
            self.detokenizer.skip(new_token_ids[-1])
        return ProcessedOutput(self.stops.feed(delta, final=finished), self.stop_matched)
