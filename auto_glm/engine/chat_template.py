"""Chat messages -> prompt token ids, with the messages' text never read as special tokens.

Rendering the model's chat template to one string and encoding it lets a user message that
contains ``<|assistant|>`` or ``[gMASK]`` become the real control token: the user could
forge turns. Here the template is rendered a second time with each message's content
replaced by a random placeholder. The text between placeholders is the template's own
(its markers stay special tokens); each content is encoded on its own with special tokens
split into plain text. Templates that trim the content are followed: the content is taken
as rendered when that reproduces the template's own output.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Sequence

from jinja2 import TemplateError

__all__ = ["ChatTemplateError", "encode_chat"]

log = logging.getLogger("auto_glm.engine")


class ChatTemplateError(ValueError):
    """The model has no chat template (``code`` ``no_chat_template``), or its template
    refused the messages (``invalid_messages``)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def _render(tokenizer, turns: Sequence[dict]) -> str:
    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    except TemplateError as exc:
        raise ChatTemplateError(
            f"the model's chat template rejected the messages: {exc}", "invalid_messages"
        ) from exc


def _segments(rendered: str, masked: str, slot: re.Pattern, contents: list[str]) -> list[str]:
    """``masked`` split at the placeholders: template text at even positions, contents (as
    the template rendered them, possibly trimmed, where that can be told) at odd ones."""
    parts: list = []
    for i, piece in enumerate(slot.split(masked)):
        parts.append(piece if i % 2 == 0 else int(piece))
    for shape in (lambda text: text, str.strip):
        shaped = [shape(c) for c in contents]
        if "".join(p if isinstance(p, str) else shaped[p] for p in parts) == rendered:
            return [p if isinstance(p, str) else shaped[p] for p in parts]
    # The template changes the content in another way (e.g. drops a reasoning block): keep
    # the content as sent, still encoded as plain text.
    log.debug("chat template alters message content; encoding the content as sent")
    return [p if isinstance(p, str) else contents[p] for p in parts]


def encode_chat(tokenizer, turns: Sequence[dict]) -> list[int]:
    """Token ids of ``turns`` (``{"role", "content"}`` dicts with text content) in the
    model's chat template, ending with the prompt for the assistant's reply."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ChatTemplateError(
            "this model has no chat template; send a plain prompt (/v1/completions) instead",
            "no_chat_template",
        )
    contents = [str(turn.get("content") or "") for turn in turns]
    rendered = _render(tokenizer, turns)
    nonce = secrets.token_hex(8)
    slot = re.compile(f"@@autoglm-{nonce}-(\\d+)@@")
    masked = _render(
        tokenizer,
        [{**turn, "content": f"@@autoglm-{nonce}-{i}@@"} for i, turn in enumerate(turns)],
    )
    ids: list[int] = []
    for index, piece in enumerate(_segments(rendered, masked, slot, contents)):
        if piece:  # odd pieces are message content: special tokens split into plain text
            split = index % 2 == 1
            ids += tokenizer.encode(piece, add_special_tokens=False, split_special_tokens=split)
    return ids
