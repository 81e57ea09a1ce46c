"""The exact bytes of each token, for the ``bytes`` of chat logprobs.

Byte-level tokenizers (GLM-4, Llama 3, Qwen) split a character of several UTF-8 bytes
across tokens; alone, each such token decodes to U+FFFD, whose own bytes say nothing.
The bytes come from llguidance's reading of the tokenizer (byte-level and byte-fallback
vocabularies alike), built once per tokenizer: call :func:`token_bytes` off the event loop
first (about a second for a large vocabulary), after which it returns at once. A tokenizer
llguidance cannot read (not a fast one) gives each token's decoded text as UTF-8.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for hints: importing llguidance loads its native library
    import llguidance

__all__ = ["token_bytes"]

_lock = threading.Lock()
# tokenizer -> llguidance's reading of it, None where it cannot read it; the values hold
# no reference to their keys, so an unloaded model's entry goes with its tokenizer
_vocabularies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _vocabulary(tokenizer) -> llguidance.LLTokenizer | None:
    import llguidance.hf

    try:
        return llguidance.hf.from_tokenizer(tokenizer, slices=[])
    except ValueError:  # a slow (Python) tokenizer
        return None


def token_bytes(tokenizer) -> Callable[[int], bytes]:
    """``read(token_id)``: the bytes of one token of ``tokenizer``; safe on any thread."""
    with _lock:
        if tokenizer not in _vocabularies:
            _vocabularies[tokenizer] = _vocabulary(tokenizer)
        vocabulary = _vocabularies[tokenizer]

    def read(token_id: int) -> bytes:
        # an id past the tokenizer (a padded vocabulary) has no bytes of its own
        if vocabulary is not None and token_id < vocabulary.vocab_size:
            return vocabulary.decode_bytes([token_id])
        return tokenizer.decode([token_id], skip_special_tokens=False).encode()

    return read
