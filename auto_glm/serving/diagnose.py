"""Precise errors for values that pydantic can only call "not a valid string".

A field typed as a union (``prompt``: text, token ids, or a batch of either) fails with one
error per member when it fits none, and the first says "Input should be a valid string"
even for ``[-1]``. The functions here run only after that failure (the fast path stays
pydantic's own), look at the raw JSON value and name the real problem and where it is:
``prompt[0]: token id -1 is negative``. Each raises a ``PydanticCustomError`` whose type
is the error's stable ``code``; ``ctx["at"]`` is the position inside the field.
"""

from __future__ import annotations

from typing import Any, NoReturn

from pydantic_core import PydanticCustomError

__all__ = [
    "check_text",
    "check_unicode",
    "diagnose_content",
    "diagnose_prompt",
    "diagnose_stop",
    "json_kind",
]


def json_kind(value: Any) -> str:
    """The JSON name of a parsed value's type, as a client would write it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value!r:.30}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _fail(code: str, message: str, at: str = "") -> NoReturn:
    raise PydanticCustomError(code, message, {"at": at})


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_token_ids(ids: list, at: str) -> None:
    if not ids:
        _fail("empty_prompt", "is an empty list; send at least one token id", at)
    for i, token in enumerate(ids):
        if not _is_token_id(token):
            _fail(
                "invalid_token_id",
                f"expected a token id (an integer of 0 or more), got {json_kind(token)}",
                f"{at}[{i}]",
            )
        if token < 0:
            _fail("negative_token_id", f"token id {token} is negative", f"{at}[{i}]")


def diagnose_prompt(value: Any, max_batch: int | None) -> None:
    """Why ``value`` is not a prompt; ``max_batch`` None: batches are not accepted here.

    Returns when it finds nothing wrong with the shape (the caller keeps pydantic's error).
    """
    if isinstance(value, str):
        return
    accepted = "text or a list of token ids"
    if max_batch is not None:
        accepted += ", or a list of either (a batch)"
    if not isinstance(value, list):
        _fail("invalid_prompt_type", f"expected {accepted}, got {json_kind(value)}")
    if not value:
        _fail("empty_prompt", "is an empty list; send text or at least one token id")
    first = value[0]
    if _is_token_id(first):
        _check_token_ids(value, "")
    if not isinstance(first, str | list):
        _fail("invalid_prompt_type", f"expected {accepted}, got {json_kind(first)}", "[0]")
    if max_batch is None:
        _fail(
            "prompt_batch_not_supported",
            "a batch of prompts is not accepted here; send one text or one list of token "
            "ids (batches go to /v1/completions)",
        )
    if len(value) > max_batch:
        _fail(
            "too_many_prompts",
            f"is a batch of {len(value)} prompts; one call takes at most {max_batch}",
        )
    for i, item in enumerate(value):
        if isinstance(first, str) and not isinstance(item, str):
            _fail(
                "invalid_prompt_type",
                f"expected a string like the first prompt, got {json_kind(item)}",
                f"[{i}]",
            )
        if isinstance(first, list):
            if not isinstance(item, list):
                _fail(
                    "invalid_prompt_type",
                    f"expected a list of token ids like the first prompt, got {json_kind(item)}",
                    f"[{i}]",
                )
            _check_token_ids(item, f"[{i}]")


def diagnose_stop(value: Any, most: int) -> None:
    """Why ``value`` is not a stop string or a list of at most ``most`` of them; returns
    when it finds nothing wrong with the shape (the caller keeps pydantic's error)."""
    if isinstance(value, str) and not value:
        _fail("empty_stop_string", "is an empty string; omit stop or send non-empty strings")
    if isinstance(value, str):
        check_unicode(value)
        return
    if not isinstance(value, list):
        _fail(
            "invalid_stop_type", f"expected a string or a list of strings, got {json_kind(value)}"
        )
    if len(value) > most:
        _fail(
            "too_many_stop_strings",
            f"has {len(value)} stop strings; at most {most} are allowed",
        )
    for i, item in enumerate(value):
        if not isinstance(item, str):
            _fail("invalid_stop_type", f"expected a string, got {json_kind(item)}", f"[{i}]")
        if not item:
            _fail(
                "empty_stop_string", "is an empty string; stop strings must not be empty", f"[{i}]"
            )
        _check_text(item, f"[{i}]")


def diagnose_content(value: Any) -> None:
    """Why a chat message's ``content`` (a string, a list of text parts, or null) is
    refused; returns when it finds nothing (the caller keeps pydantic's error)."""
    if isinstance(value, str) or value is None:
        return
    if not isinstance(value, list):
        _fail(
            "invalid_content_type",
            f"expected a string or a list of content parts, got {json_kind(value)}",
        )
    for i, part in enumerate(value):
        if not isinstance(part, dict):
            _fail(
                "invalid_content_type",
                f"expected a content part object, got {json_kind(part)}",
                f"[{i}]",
            )
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                _fail(
                    "invalid_content_type",
                    "a text part needs text, a string; got "
                    + ("nothing" if "text" not in part else json_kind(text)),
                    f"[{i}].text",
                )
            _check_text(text, f"[{i}].text")
        elif kind == "image_url":
            url = part.get("image_url")
            if not isinstance(url, dict) or not isinstance(url.get("url"), str):
                _fail(
                    "invalid_content_type",
                    'an image part needs image_url, an object {"url": "data:image/png;base64,'
                    '..."}; got ' + ("nothing" if "image_url" not in part else json_kind(url)),
                    f"[{i}].image_url",
                )
        elif isinstance(kind, str):
            _fail(
                "unsupported_content_part",
                f"content parts of type {kind[:40]!r} are not supported; send text parts "
                '({"type": "text", "text": "..."}), image parts ({"type": "image_url", '
                '"image_url": {"url": "data:image/png;base64,..."}}) or a string',
                f"[{i}]",
            )


def check_text(value: Any) -> None:
    """Raise the precise error when ``value`` is a string holding a lone surrogate (for
    strings pydantic refused with its generic "unable to parse" message)."""
    if isinstance(value, str):
        _check_text(value, "")


def check_unicode(value: Any) -> Any:
    """``value`` (a validated field) unchanged, or an error when a string in it holds a lone
    UTF-16 surrogate (``"\\ud800"`` is valid JSON but not text: it cannot be tokenized)."""
    if isinstance(value, str):
        _check_text(value, "")
    elif isinstance(value, list) and value and isinstance(value[0], str):
        for i, text in enumerate(value):
            _check_text(text, f"[{i}]")
    return value


def _check_text(text: str, at: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        _fail(
            "invalid_unicode",
            f"holds the lone surrogate \\u{ord(text[exc.start]):04x} at character "
            f"{exc.start}, which is not valid Unicode; send text as UTF-8, with characters "
            "outside the BMP as a surrogate pair or unescaped",
            at,
        )
