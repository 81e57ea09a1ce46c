"""Checks of what a chat template receives besides message text: tools, the arguments of
earlier tool calls, and extra template variables (``chat_template_kwargs``).

Message text is masked while rendering (see :mod:`.chat_template`); these values are not,
so a special token's text in them would be encoded as the real control token. They are
refused instead, naming where the token was found. Template variables that steer the
rendering itself (``add_generation_prompt``, ``tokenize``, ``chat_template``) or replace
the tokenizer's special tokens (``eos_token``) are refused by name.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["ChatTemplateError", "check_data", "check_kwargs"]

# template variables transformers fills from the tokenizer: replacing them would let a
# caller choose text the template emits as its own (a forged marker)
_TOKENIZER_VARIABLES = frozenset(
    {
        "messages",
        "bos_token",
        "eos_token",
        "unk_token",
        "sep_token",
        "pad_token",
        "cls_token",
        "mask_token",
        "additional_special_tokens",
        "extra_special_tokens",
    }
)


class ChatTemplateError(ValueError):
    """The model has no chat template (``code`` ``no_chat_template``), its template refused
    the messages (``invalid_messages``), or an input is unsafe to render; ``param`` names
    the request field at fault."""

    def __init__(self, message: str, code: str, param: str = "messages") -> None:
        super().__init__(message)
        self.code = code
        self.param = param


def _control_tokens(tokenizer) -> list[str]:
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens = {t.content for t in decoder.values() if getattr(t, "special", False)}
    tokens.update(getattr(tokenizer, "all_special_tokens", []) or [])
    return sorted((t for t in tokens if t), key=len, reverse=True)


def _strings(value: Any, where: str):
    """Every string inside ``value`` (keys included), with its path."""
    if isinstance(value, str):
        yield value, where
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key), f"{where}.{key}"
            yield from _strings(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _strings(item, f"{where}[{i}]")


def check_data(tokenizer, value: Any, param: str) -> None:
    """Raise ChatTemplateError (``control_token_in_data``) when a string inside ``value``
    holds the text of one of the tokenizer's special tokens."""
    tokens = _control_tokens(tokenizer)
    for text, where in _strings(value, param):
        found = next((t for t in tokens if t in text), None)
        if found is not None:
            raise ChatTemplateError(
                f"{where} contains {found!r}, the text of one of the model's control tokens; "
                "it would be rendered as the token itself. Remove it from the value",
                "control_token_in_data",
                param,
            )


def check_kwargs(tokenizer, kwargs: dict | None) -> dict:
    """``kwargs`` for the chat template, checked: parameters of ``apply_chat_template`` and
    the tokenizer's own template variables are refused by name."""
    if not kwargs:
        return {}
    signature = inspect.signature(tokenizer.apply_chat_template).parameters
    reserved = _TOKENIZER_VARIABLES | {
        name for name, p in signature.items() if p.kind is not p.VAR_KEYWORD
    }
    for key in kwargs:
        if key in reserved:
            raise ChatTemplateError(
                f"chat_template_kwargs may not set {key!r}: the server decides it (it renders "
                "the template itself); pass only template variables such as enable_thinking",
                "invalid_template_kwargs",
                "chat_template_kwargs",
            )
    check_data(tokenizer, kwargs, "chat_template_kwargs")
    return dict(kwargs)
