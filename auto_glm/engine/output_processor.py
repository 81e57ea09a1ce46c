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

from auto_glm.engine.outputs import Text, TextSoFar
from auto_glm.sampling_params import SamplingParams

if TYPE_CHECKING:  # only for hints: importing transformers is slow
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "PROMPT_CONTEXT",
    "IncrementalDetokenizer",
    "ProcessedOutput",
    "RequestOutputProcessor",
    "StopStringMatcher",
]

# Prompt tokens decoded before the first output token, so that tokenizers whose text
# depends on the left context (sentencepiece's leading spaces) decode it as in the full text.
PROMPT_CONTEXT = 6


class _Decoding(NamedTuple):
    """How one tokenizer decodes: ``decode(ids) -> text``, and which ids show no text
    whatever surrounds them, those it drops before its decoder runs: ids from
    ``vocab_end`` up (None where that is not known) and those in ``skipped``. ``backend``:
    the Rust tokenizer that ``decode`` calls directly, None where it calls transformers'."""

    decode: Callable[[list[int]], str]
    vocab_end: int | None  # ids from here up have no token
    skipped: frozenset[int]  # special ids dropped by this decode
    backend: Any = None


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
    return _Decoding(decode, known[1], known[2] if skip_special_tokens else frozenset(), backend)


def _decode_stream(context: list[int], skip_special_tokens: bool) -> Any:
    """``tokenizers``' incremental decoder (``DecodeStream``) started on ``context``, or None
    where the installed ``tokenizers`` cannot start one there (before 0.22)."""
    try:
        from tokenizers.decoders import DecodeStream

        return DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
    except (ImportError, TypeError):
        return None


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

    For a fast tokenizer without that spacing, ``tokenizers``' ``DecodeStream`` keeps the
    same window in Rust, and this class keeps the window's bounds beside it: an end of
    request that leaves a character incomplete (which ``DecodeStream`` never releases), a
    stop token skipped, or an error of ``DecodeStream`` goes on in Python from there.
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
        context = list(prompt_token_ids or [])[-PROMPT_CONTEXT:]
        self._backend = decoding.backend
        self._stream = None  # DecodeStream over the same window, or None: Python decodes
        # DecodeStream starts its window after the context's last whole character: a context
        # that ends mid-character would have its text emitted with the first token
        if (
            decoding.backend is not None
            and not self._special
            and not decoding.decode(context).endswith("\ufffd")
        ):
            self._stream = _decode_stream(context, skip_special_tokens)
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
        self._stream = None  # its window would still hold the token

    def step(self, new_token_ids: list[int], flush: bool = False) -> str:
        """Add output tokens and return the text they complete; ``flush`` (the request
        ended) also returns an incomplete character's replacement text."""
        self._out += new_token_ids
        ids, end = self._ids, self._vocab_end
        start = len(ids)
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
        if self._stream is not None:
            try:
                text = self._stream.step(self._backend, ids[start:])
            except Exception:  # its prefix check, or a tokenizers that steps one id only
                self._stream = None
            else:
                if text is not None:
                    self._prefix, self._read = read, length
                    return text
                if not flush:
                    return ""
                self._stream = None  # Python releases the incomplete character below
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
    next text settles it, or until ``feed(..., final=True)`` releases it. The text emitted
    grows as pieces (:class:`Text`), so a token costs the same at any length of output.
    """

    def __init__(self, stop: list[str]) -> None:
        if not all(stop):
            raise ValueError("stop strings must be non-empty: drop the empty ones")
        self.stop = list(stop)
        self._longest = max((len(s) for s in stop), default=0)
        self._emitted = Text()  # the text returned so far
        self._held = ""  # the text after it: a possible beginning of a stop string
        self.matched: str | None = None

    @property
    def text(self) -> str:
        """All text so far, cut before the stop string once one matched."""
        return str(self.so_far())

    def so_far(self) -> TextSoFar:
        """:attr:`text` as a view, joined only when read."""
        return self._emitted.so_far(self._held)

    def feed(self, delta: str, final: bool = False) -> str:
        if self.matched is not None:
            return ""  # text after a stop string is dropped
        if not self.stop:  # nothing to find, nothing to hold back
            self._emitted.append(delta)
            return delta
        # a match must end inside the new text, so it starts at most len(stop)-1 before it
        start = max(0, len(self._held) - self._longest + 1)
        pending = self._held + delta
        found = [(pos, s) for s in self.stop if (pos := pending.find(s, start)) >= 0]
        if found:
            pos, self.matched = min(found)
            return self._release(pending[:pos], "")
        end = len(pending) if final else len(pending) - self._held_back(pending)
        return self._release(pending[:end], pending[end:])

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _release(self, out: str, held: str) -> str:
        self._emitted.append(out)
        self._held = held
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

    def text_so_far(self) -> TextSoFar:
        """:attr:`text` as a view, joined only when read: what an update carries."""
        return self.stops.so_far()

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
