"""Structured output: grammars that constrain decoding, enforced with llguidance.

A :class:`GrammarCompiler` belongs to one engine. It wraps the model's tokenizer for
llguidance once (lazily: about a second for a large vocabulary) and compiles each distinct
:class:`StructuredOutput` once, keyed by its kind and schema text. Compiling runs on the
caller's thread when a request is submitted, so a bad schema is a :class:`GrammarError` (a
``ValueError``) before any work is queued. Every request gets its own :class:`Grammar`, a
copy of the compiled matcher that follows that request's output tokens only, so it needs
nothing on preemption (outputs are kept and recomputed, never rolled back).

Each step the sampler asks :func:`allowed_tokens` for the constrained rows' masks. The
end-of-sequence tokens are allowed only where the grammar accepts; ids the tokenizer does
not have (a padded vocabulary) are never allowed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import torch

from auto_glm.sampling_params import StructuredOutput

if TYPE_CHECKING:  # only for hints: importing llguidance loads its native library
    import llguidance

__all__ = ["Grammar", "GrammarCompiler", "GrammarError", "allowed_tokens"]

# Compact JSON (no optional whitespace): a model cannot stall in a run of blank space, and
# unsupported schema keywords are errors, not silently ignored (``lenient`` is off).
_JSON_OPTIONS = {"whitespace_flexible": False, "lenient": False}
_ANY_OBJECT = '{"type": "object"}'
_MAX_MESSAGE = 500  # characters of llguidance's reason quoted in an error


class GrammarError(ValueError):
    """A structured-output request whose grammar cannot be compiled."""


class Grammar:
    """One request's place in its grammar; consumes each output token as it is sampled."""

    def __init__(
        self, matcher: llguidance.LLMatcher, executor: llguidance.LLExecutor, mask_words: int
    ) -> None:
        self.matcher = matcher
        self.executor = executor
        self.mask_words = mask_words  # int32 words of one allowed-token bitmask

    def accept(self, token_id: int) -> bool:
        """Advance past ``token_id``; False when the grammar does not allow it (see
        :attr:`error`)."""
        return self.matcher.consume_token(token_id)

    @property
    def is_complete(self) -> bool:
        """The grammar is satisfied and allows nothing more but end-of-sequence."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str:
        """Why the grammar stopped: llguidance's first line (its parser state and the whole
        grammar follow it, a kilobyte a client has no use for)."""
        return self.matcher.get_error().split("\n<state>", 1)[0].strip()


def allowed_tokens(
    grammars: list[Grammar], rows: list[int], batch: int, vocab: int
) -> torch.Tensor:
    """[batch, vocab] bool on the CPU: row ``rows[i]`` allows what ``grammars[i]`` allows
    next; every other row allows every token."""
    import llguidance.numpy as llnp

    bitmask = np.full((batch, grammars[0].mask_words), -1, dtype=np.int32)  # [B, W]
    matchers = [(g.matcher, row) for g, row in zip(grammars, rows, strict=True)]
    llnp.fill_next_token_bitmask_par(grammars[0].executor, matchers, bitmask)
    # bit k of word w is token 32 * w + k: little-endian bytes, least significant bit first
    octets = bitmask.astype("<i4", copy=False).view(np.uint8)  # [B, 4 * W]
    bits = np.unpackbits(octets, axis=1, bitorder="little")  # [B, 32 * W] of 0 and 1
    return torch.from_numpy(bits[:, :vocab]).view(torch.bool)  # [B, vocab]


class GrammarCompiler:
    """Compiles structured-output requests for one model; safe to call from any thread.

    ``vocab_size`` is the width of the model's logits, which may be larger than the
    tokenizer (padded) or, rarely, smaller; ``eos_token_ids`` end a grammar's output.
    """

    def __init__(
        self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int], max_cached: int = 256
    ) -> None:
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.max_cached = max_cached
        self._lock = threading.Lock()
        self._compiled: OrderedDict[StructuredOutput, llguidance.LLMatcher] = OrderedDict()
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None

    @property
    def num_compiled(self) -> int:
        """Distinct grammars compiled and kept (at most ``max_cached``)."""
        return len(self._compiled)

    def grammar(self, spec: StructuredOutput) -> Grammar:
        """A fresh matcher for one request; raises :class:`GrammarError` for a schema that
        cannot be enforced."""
        with self._lock:
            template = self._compiled.get(spec)
            if template is None:
                template = self._compile(spec)
                self._compiled[spec] = template
                if len(self._compiled) > self.max_cached:
                    self._compiled.popitem(last=False)
            else:
                self._compiled.move_to_end(spec)
            assert self._tokenizer is not None and self._executor is not None
            words = -(-self._tokenizer.vocab_size // 32)
            return Grammar(template.deep_copy(), self._executor, words)

    def _compile(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        import llguidance

        if spec.kind == "json_object":
            schema = _ANY_OBJECT
        elif spec.kind == "json_schema":
            if spec.schema is None:
                raise GrammarError(
                    "structured output json_schema has no schema: pass the JSON schema as text"
                )
            schema = spec.schema
        else:
            raise GrammarError(
                f"structured output kind {spec.kind!r} is unknown; use json_object or json_schema"
            )
        try:
            text = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except ValueError as exc:
            raise GrammarError(_message(f"is not a JSON schema object ({exc})")) from exc
        matcher = llguidance.LLMatcher(self._llg_tokenizer(), text, log_level=0)
        if matcher.is_error():
            raise GrammarError(_message(f"cannot be enforced: {matcher.get_error()}"))
        return matcher

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            import llguidance
            import llguidance.hf

            # at least as wide as the logits, so every id has a bit in the mask
            n_vocab = max(self.vocab_size, len(self.hf_tokenizer))
            try:
                self._tokenizer = llguidance.hf.from_tokenizer(
                    self.hf_tokenizer, n_vocab=n_vocab, eos_token=self.eos_token_ids or None
                )
            except ValueError as exc:
                raise GrammarError(
                    f"structured output needs a fast (Rust) Hugging Face tokenizer, and this "
                    f"model's cannot be used ({exc}); serve the model with a tokenizer.json"
                ) from exc
            self._executor = llguidance.LLExecutor()
        return self._tokenizer


def _message(reason: str) -> str:
    if len(reason) > _MAX_MESSAGE:
        reason = f"{reason[:_MAX_MESSAGE]}..."
    return f"the JSON schema the reply must follow {reason}; fix the schema"
