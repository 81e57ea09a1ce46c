"""Edits to one step's logits before sampling: ``logit_bias``, then grammar masks.

:meth:`LogitConstraints.from_requests` returns None when no row has a bias or a grammar, so
an unconstrained batch pays one scan of its requests and nothing per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real

import torch

from auto_glm.engine.request import Request
from auto_glm.engine.structured import Grammar, allowed_tokens
from auto_glm.platforms import tensor_on, to_device
from auto_glm.sampling_params import LOGIT_BIAS_LIMIT as _LIMIT

__all__ = ["LogitConstraints", "check_logit_bias"]


def check_logit_bias(bias: dict[int, float], vocab: int) -> None:
    """Raise ``ValueError`` naming the keys that are not integer ids, the ids outside
    ``[0, vocab)`` or a bias that is not a number within ``LOGIT_BIAS_LIMIT`` of 0."""
    keys = [t for t in bias if isinstance(t, bool) or not isinstance(t, int)]
    if keys:
        raise ValueError(f"logit_bias keys must be integer token ids, got {keys[:5]}")
    bad = [t for t in bias if not 0 <= t < vocab]
    if bad:
        raise ValueError(
            f"logit_bias token ids {bad[:5]} are outside the vocabulary [0, {vocab}); "
            f"bias only ids from 0 to {vocab - 1}"
        )
    odd = [
        t
        for t, v in bias.items()
        if isinstance(v, bool) or not isinstance(v, Real) or not -_LIMIT <= v <= _LIMIT
    ]
    if odd:
        raise ValueError(
            f"logit_bias of token ids {odd[:5]} is not a number from -{_LIMIT:g} to "
            f"{_LIMIT:g}; give -{_LIMIT:g} to ban a token and {_LIMIT:g} to force it "
            "(as OpenAI's logit_bias)"
        )


@dataclass
class LogitConstraints:
    """The biased and the grammar-constrained rows of one sampling batch."""

    bias_rows: torch.Tensor | None  # [N] int64 row of each biased id; None: no bias
    bias_ids: torch.Tensor | None  # [N] int64
    bias_values: torch.Tensor | None  # [N] float32
    grammar_rows: list[int]  # [G] rows that follow a grammar
    grammars: list[Grammar]  # [G] in the order of grammar_rows

    @classmethod
    def from_requests(
        cls, requests: list[Request], device: torch.device
    ) -> LogitConstraints | None:
        biased = [
            (row, r.sampling_params.logit_bias)
            for row, r in enumerate(requests)
            if r.sampling_params.logit_bias
        ]
        constrained = [(row, r.grammar) for row, r in enumerate(requests) if r.grammar is not None]
        if not biased and not constrained:
            return None
        bias_rows = bias_ids = bias_values = None
        if biased:
            entries = [(row, t, v) for row, bias in biased for t, v in bias.items()]
            rows, ids, values = zip(*entries, strict=True)
            bias_rows = tensor_on(rows, torch.long, device)
            bias_ids = tensor_on(ids, torch.long, device)
            bias_values = tensor_on(values, torch.float32, device)
        grammar_rows = [row for row, _ in constrained]
        return cls(bias_rows, bias_ids, bias_values, grammar_rows, [g for _, g in constrained])

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [B, V] plus the biases, with each grammar row's disallowed tokens at
        -inf; a new tensor (the input is left as it is)."""
        if self.bias_rows is not None:
            index = (self.bias_rows, self.bias_ids)
            logits = logits.index_put(index, self.bias_values, accumulate=True)  # [B, V]
        if self.grammars:
            batch, vocab = logits.shape
            keep = allowed_tokens(self.grammars, self.grammar_rows, batch, vocab)  # [B, V]
            logits = torch.where(to_device(keep, logits.device), logits, float("-inf"))
        return logits
