"""GLM-4 (glm-4-9b-chat, GLM-4-0414) tool calls: the reply is ``name\\n{json arguments}``.

The template renders each earlier call as ``<|assistant|>name\\n{arguments}``, so several
calls follow each other, separated by ``<|assistant|>`` (a special token: absent from the
text unless ``skip_special_tokens`` is false). The first line must name a declared tool;
any other reply is content.
"""

from __future__ import annotations

import json

from auto_glm.serving.tools.base import ParsedCall, WholeReplyParser

__all__ = ["Glm4Parser"]

_SEPARATOR = "<|assistant|>"


class Glm4Parser(WholeReplyParser):
    def may_start(self, text: str) -> bool:
        text = text.lstrip()
        line, newline, rest = text.partition("\n")
        if not newline:  # the name so far (its line may end in spaces or \r, as it does)
            return any(name.startswith(line.rstrip()) for name in self.schemas)
        rest = rest.lstrip()
        return line.strip() in self.schemas and (not rest or rest.startswith("{"))

    def parse_reply(self, text: str) -> list[ParsedCall] | None:
        decoder, calls, pos = json.JSONDecoder(), [], 0
        while True:
            rest = text[pos:].lstrip()
            rest = rest.removeprefix(_SEPARATOR).lstrip()
            if not rest:
                return calls or None
            name, newline, after = rest.partition("\n")
            if not newline:
                return None
            try:
                arguments, pos = decoder.raw_decode(text, len(text) - len(after.lstrip()))
            except ValueError:
                return None
            call = self.call(name.strip(), arguments)
            if call is None:
                return None
            calls.append(call)
