"""Per-request sampling parameters, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Literal

__all__ = ["LOGIT_BIAS_LIMIT", "REPETITION_PENALTY_RANGE", "SamplingParams", "StructuredOutput"]

_INTEGERS = ("max_tokens", "top_k", "seed", "logprobs")  # the last three may be None
_NUMBERS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)
# Below this a temperature is greedy: float32 logits divided by it overflow (1e-300 gave NaN
# probabilities and tokens), and a temperature this low picks the argmax anyway.
_GREEDY_BELOW = 1e-5
# A top_k this large keeps every token of any vocabulary, as 0 does; it is held as 0, since
# the sampler's int64 column cannot hold every integer (2**70 ended the engine's loop).
_NO_VOCABULARY_REACHES = 2**31
# A repetition penalty outside these bounds overflows the float32 logits it divides or
# multiplies (1e-40 made them infinite and every token id 0), and a penalty this far from 1
# already settles every seen token's fate.
REPETITION_PENALTY_RANGE = (1e-6, 1e6)
_LOW_PENALTY, _HIGH_PENALTY = REPETITION_PENALTY_RANGE
# The largest logit_bias either way (OpenAI's range): larger ones would overflow float32
# logits and force nothing more.
LOGIT_BIAS_LIMIT = 100.0
_FLAGS = ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens")


def _kind(value: object) -> str:
    return "True/False" if isinstance(value, bool) else type(value).__name__


@dataclass(frozen=True)
class StructuredOutput:
    """A grammar the generated text must follow, enforced token by token while decoding.

    ``json_object``: any JSON object. ``json_schema``: JSON valid for ``schema`` (the
    schema as JSON text, so equal schemas share one compiled grammar).
    """

    kind: Literal["json_object", "json_schema"]
    schema: str | None = None


@dataclass
class SamplingParams:
    """How one request is decoded. ``temperature=0`` (or below 1e-5) means greedy.

    ``top_k <= 0`` (or a top_k beyond any vocabulary) and ``top_p == 1`` disable those
    filters. ``logprobs`` is the number of top alternatives returned per generated token
    (``None``: no logprobs).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    structured_output: StructuredOutput | None = None

    def __post_init__(self) -> None:
        self._check_types()
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k is None or not 0 <= self.top_k < _NO_VOCABULARY_REACHES:
            self.top_k = 0
        checks = [
            (self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (self.temperature >= 0, "temperature", "must be >= 0 (0 means greedy)"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (
                _LOW_PENALTY <= self.repetition_penalty <= _HIGH_PENALTY,
                "repetition_penalty",
                f"must be in [{_LOW_PENALTY:g}, {_HIGH_PENALTY:g}] (1 disables it)",
            ),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"),
            (
                all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
                "stop_token_ids",
                "must be non-negative token ids",
            ),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: it {rule}")

    def _check_types(self) -> None:
        """Refuse a field of the wrong type (a seed of "7", a temperature of NaN), which
        would otherwise fail inside the engine's step, and hold numbers as Python's int and
        float (numpy's scalars are accepted)."""
        for name in (*_INTEGERS, *_NUMBERS, *_FLAGS):
            value = getattr(self, name)
            if value is None and name in ("seed", "logprobs", "top_k"):
                continue
            if name in _FLAGS:
                ok, rule = isinstance(value, bool), "must be True or False"
            elif name in _INTEGERS:
                ok, rule = isinstance(value, Integral), "must be an integer"
            else:
                ok, rule = isinstance(value, Real), "must be a finite number"
            if not ok or (isinstance(value, bool) and name not in _FLAGS):
                raise ValueError(f"{name}={value!r} is invalid: it {rule}, not {_kind(value)}")
            if name in _NUMBERS and not math.isfinite(value):
                raise ValueError(f"{name}={value!r} is invalid: it {rule}")
            if name in _INTEGERS:
                setattr(self, name, int(value))
            elif name in _NUMBERS:
                setattr(self, name, float(value))
        if self.logit_bias is not None and not isinstance(self.logit_bias, dict):
            raise ValueError(
                f"logit_bias={self.logit_bias!r} is invalid: it must be a dict of token id to "
                f"bias, not {_kind(self.logit_bias)}"
            )
        if self.structured_output is not None and not isinstance(
            self.structured_output, StructuredOutput
        ):
            raise ValueError(
                f"structured_output={self.structured_output!r} is invalid: it must be a "
                'StructuredOutput("json_object") or StructuredOutput("json_schema", schema), '
                f"not {_kind(self.structured_output)}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_BELOW

    @property
    def has_penalties(self) -> bool:
        """Whether a repetition, presence or frequency penalty is on: sampling then reads
        the tokens generated so far."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
