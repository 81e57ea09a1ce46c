"""Chat messages -> prompt token ids, with the messages' text never read as special tokens.

Rendering the model's chat template to one string and encoding it lets a user message that
contains ``<|assistant|>`` or ``[gMASK]`` become the real control token: the user could
forge turns. Here the template is rendered a second time with each piece of message text
(a string content, each text part of a list content, an assistant turn's reasoning)
replaced by a random placeholder. The text between placeholders is the template's own
(its markers stay special tokens); each piece is encoded on its own with special tokens
split into plain text. Templates that trim the text are followed: the text is taken as
rendered when that reproduces the template's own output.

Message text is encoded with a copy of the tokenizer that always splits special tokens
(:func:`_splitting`): a fast tokenizer holds that choice in its one Rust object and sets it
on each call that asks otherwise, so asking for it on the tokenizer that other threads use
flipped it under their calls (in 20% of chats encoded beside plain prompts: a template's
image placeholder split into text, or a message's ``<|user|>`` read as the real token).

Tool definitions, the arguments of earlier tool calls and ``chat_template_kwargs`` are
rendered as data (often through ``tojson``), so they cannot be masked the same way: a
special token's text in them is refused instead (:mod:`.chat_inputs`).
"""

from __future__ import annotations

import copy
import logging
import re
import secrets
import threading
import weakref
from collections.abc import Sequence

from jinja2 import TemplateError

from auto_glm.engine.chat_inputs import ChatTemplateError, check_data, check_kwargs

__all__ = ["ChatTemplateError", "encode_chat"]

log = logging.getLogger("auto_glm.engine")


_SPLITTING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its copy
_SPLITTING_LOCK = threading.Lock()


def _splitting(tokenizer):
    """``tokenizer``'s copy for message text, made once: its ``split_special_tokens`` is
    always on, so neither its flag nor the original's ever changes between calls."""
    with _SPLITTING_LOCK:
        splitting = _SPLITTING.get(tokenizer)
        if splitting is None:
            splitting = copy.deepcopy(tokenizer)
            splitting.split_special_tokens = True
            # sets the copy's flag now, while no other thread can be encoding with it
            splitting.encode("", add_special_tokens=False, split_special_tokens=True)
            _SPLITTING[tokenizer] = splitting
        return splitting


def _render(tokenizer, turns: Sequence[dict], tools, kwargs: dict) -> str:
    try:
        return tokenizer.apply_chat_template(
            list(turns), tools=tools, tokenize=False, add_generation_prompt=True, **kwargs
        )
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


def _masked(turns: Sequence[dict], placeholder) -> tuple[list[dict], list[str]]:
    """``turns`` with every piece of message text replaced by ``placeholder(i)``, and the
    texts in placeholder order."""
    texts: list[str] = []

    def mask(text: str) -> str:
        texts.append(text)
        return placeholder(len(texts) - 1)

    masked = []
    for turn in turns:
        turn = dict(turn)
        content = turn.get("content")
        if isinstance(content, list):
            turn["content"] = [
                {**part, "text": mask(part["text"])} if part.get("type") == "text" else part
                for part in content
            ]
        elif content is not None:
            turn["content"] = mask(str(content))
        if isinstance(turn.get("reasoning_content"), str):
            turn["reasoning_content"] = mask(turn["reasoning_content"])
        masked.append(turn)
    return masked, texts


def encode_chat(
    tokenizer,
    turns: Sequence[dict],
    tools: Sequence[dict] | None = None,
    template_kwargs: dict | None = None,
) -> list[int]:
    """Token ids of ``turns`` in the model's chat template, ending with the prompt for the
    assistant's reply.

    A turn is ``{"role", "content"}``; content is text, ``None`` or a list of parts
    (``{"type": "text", "text"}``, ``{"type": "image"}``); assistant turns may carry
    ``tool_calls`` (arguments as dicts) and ``reasoning_content``, tool turns
    ``tool_call_id``. ``tools`` are OpenAI tool definitions; ``template_kwargs`` are extra
    template variables (``enable_thinking``).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ChatTemplateError(
            "this model has no chat template; send a plain prompt (/v1/completions) instead",
            "no_chat_template",
        )
    kwargs = check_kwargs(tokenizer, template_kwargs)
    tools = list(tools) if tools else None
    check_data(tokenizer, tools, "tools")
    for i, turn in enumerate(turns):
        check_data(tokenizer, turn.get("tool_calls"), f"messages[{i}].tool_calls")
    nonce = secrets.token_hex(8)
    masked, contents = _masked(turns, lambda i: f"@@autoglm-{nonce}-{i}@@")
    rendered = _render(tokenizer, turns, tools, kwargs)
    slot = re.compile(f"@@autoglm-{nonce}-(\\d+)@@")
    ids: list[int] = []
    pieces = _segments(rendered, _render(tokenizer, masked, tools, kwargs), slot, contents)
    splitting = _splitting(tokenizer)
    for index, piece in enumerate(pieces):
        if not piece:
            continue
        if index % 2:  # message text: special tokens split into plain text
            ids += splitting.encode(piece, add_special_tokens=False, split_special_tokens=True)
        else:
            ids += tokenizer.encode(piece, add_special_tokens=False, split_special_tokens=False)
    return ids
