"""What the engine reports: per-step deltas from the loop, per-request results to callers.

An update's cumulative token ids and logprobs are views of the request's own growing lists
(:class:`Prefix`): a copy per update would cost O(n) per token, O(n^2) per request, on the
output thread that every stream shares. The last update's are lists of their own. Its text
likewise grows as pieces (:class:`Text`), and an update's ``text`` is joined only when read.
"""

from __future__ import annotations

import copy
import enum
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar, overload

__all__ = [
    "CompletionOutput",
    "EngineCoreOutput",
    "FinishReason",
    "Prefix",
    "RequestMetrics",
    "RequestOutput",
    "Text",
    "TextSoFar",
    "TokenLogprob",
    "cumulative",
    "with_delta",
]

T = TypeVar("T")


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id, or (set by the output processor) a stop string
    LENGTH = "length"  # max_tokens or max_model_len reached
    ABORT = "abort"  # cancelled (caller, disconnect, timeout), or failed by the engine


# (logprob of the chosen token, [(token id, logprob) of the top-n alternatives])
TokenLogprob = tuple[float, list[tuple[int, float]]]


class Prefix(Sequence[T], Generic[T]):
    """The first ``len(items)`` items of ``items``, a list that only grows: read like a list
    (len, indexing, slices, which are new lists, iteration, ==), made without a copy, and
    unchanged by what is appended later."""

    __slots__ = ("_items", "_len")

    def __init__(self, items: list[T]) -> None:
        self._items, self._len = items, len(items)

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> list[T]: ...
    def __getitem__(self, index: int | slice) -> T | list[T]:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._len)
            if step == 1:
                return self._items[start:stop]
            return [self._items[i] for i in range(start, stop, step)]
        if not -self._len <= index < self._len:
            raise IndexError(f"index {index} is out of range for {self._len} items")
        return self._items[index % self._len]

    def __iter__(self) -> Iterator[T]:
        return itertools.islice(self._items, self._len)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Prefix):
            other = other._items[: other._len]
        if isinstance(other, list):
            return self._items[: self._len] == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to lists, which have none

    def __repr__(self) -> str:
        return repr(list(self))


def cumulative(items: list[T], last: bool) -> Sequence[T]:
    """An update's view of ``items`` (a request's growing list), or, in its ``last``
    update, a list of its own."""
    return list(items) if last else Prefix(items)


class Text:
    """A request's text as the pieces it grew by: each appended in O(1) (a ``str`` held in an
    attribute is copied whole by ``+=``), read as one string through :meth:`so_far`'s views.
    A read joins only the pieces added since the last one onto that one's string, so a
    caller that reads every update copies the text once per read, as before, not more."""

    __slots__ = ("_joined", "_pieces")

    def __init__(self) -> None:
        self._pieces: list[str] = []
        self._joined: tuple[int, str] = (0, "")  # (pieces, their text) at the last read

    def append(self, piece: str) -> None:
        if piece:
            self._pieces.append(piece)

    def so_far(self, tail: str = "") -> TextSoFar:
        """The text now, then ``tail``, unchanged by what is appended later."""
        return TextSoFar(self, len(self._pieces), tail)

    def join(self, count: int) -> str:
        """The first ``count`` pieces as one string (any thread: one tuple is swapped)."""
        done, text = self._joined
        if count < done:  # an older view, read after a newer one
            return "".join(self._pieces[:count])
        if count > done:
            text += "".join(self._pieces[done:count])
            self._joined = (count, text)
        return text

    def __str__(self) -> str:
        return self.join(len(self._pieces))


class TextSoFar:
    """A :class:`Text`'s first ``count`` pieces, then ``tail``: joined by ``str()``."""

    __slots__ = ("_count", "_tail", "_text")

    def __init__(self, text: Text, count: int, tail: str) -> None:
        self._text, self._count, self._tail = text, count, tail

    def __str__(self) -> str:
        joined = self._text.join(self._count)
        return joined + self._tail if self._tail else joined


class _JoinedOnRead:
    """A ``str`` field that may be given a :class:`TextSoFar`, joined when first read: an
    update nobody reads the whole text of (a stream's, which sends its delta) costs no
    copy of it."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._slot = f"_{name}"

    def __get__(self, obj: object, owner: type | None = None) -> str:
        if obj is None:  # the class's own: a dataclass field without a default
            raise AttributeError(self._slot[1:])
        value = obj.__dict__[self._slot]
        if not isinstance(value, str):
            value = obj.__dict__[self._slot] = str(value)
        return value

    def __set__(self, obj: object, value: str | TextSoFar) -> None:
        obj.__dict__[self._slot] = value


@dataclass
class RequestMetrics:
    """Monotonic timestamps (seconds) of one request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass
class EngineCoreOutput:
    """New tokens of one request after one step, sent from the loop thread."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob | None]
    finish_reason: FinishReason | None = None
    error: str | None = None  # set when the engine failed the request
    error_code: str | None = None  # the API's code, when the request's input was at fault


@dataclass
class CompletionOutput:
    # everything generated so far (stop string excluded); given as a TextSoFar, joined when
    # first read
    text: str = _JoinedOnRead()  # type: ignore[assignment]
    token_ids: Sequence[int]  # every output id so far (a Prefix but in the last update)
    delta_text: str  # what this update added
    delta_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    # one per token_ids entry (a Prefix but in the last update)
    logprobs: Sequence[TokenLogprob | None] = field(default_factory=list)
    stop_reason: str | int | None = None  # the stop string or token id that matched


@dataclass
class RequestOutput:
    """One update of a request, as the Python API and the server see it."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: CompletionOutput
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None


def with_delta(
    outputs: CompletionOutput, delta_text: str, delta_token_ids: list[int]
) -> CompletionOutput:
    """``outputs`` with another delta; its text is not joined (``dataclasses.replace`` would
    read it)."""
    merged = copy.copy(outputs)
    merged.delta_text, merged.delta_token_ids = delta_text, delta_token_ids
    return merged
