"""Which tool-call parser a served model gets: the ``tool_call_parser`` setting, or for
``auto`` the model's chat template and architecture.

``auto``: a template that writes ``<arg_key>`` is GLM-4.5's format; ``<tool_call>`` is
Hermes/Qwen's; ``<|python_tag|>`` is Llama 3's; ``<|observation|>`` is GLM-4's. Without a
telling marker the architecture decides (``Glm4*``/``Glm*`` -> glm4, ``Glm4Moe*`` ->
glm45, ``Qwen*`` -> hermes, ``Llama*`` -> llama3). ``none`` turns parsing off: calls stay
in the content.
"""

from __future__ import annotations

from collections.abc import Sequence

from auto_glm.serving.tools.base import ToolCallParser
from auto_glm.serving.tools.glm4 import Glm4Parser
from auto_glm.serving.tools.glm45 import Glm45Parser
from auto_glm.serving.tools.hermes import HermesParser
from auto_glm.serving.tools.llama3 import Llama3Parser

__all__ = ["PARSERS", "pick_parser"]

PARSERS: dict[str, type[ToolCallParser]] = {
    "glm4": Glm4Parser,
    "glm45": Glm45Parser,
    "hermes": HermesParser,
    "llama3": Llama3Parser,
}
_TEMPLATE_MARKERS = (
    ("<arg_key>", "glm45"),
    ("<tool_call>", "hermes"),
    ("<|python_tag|>", "llama3"),
    ("<|observation|>", "glm4"),
)
_ARCHITECTURES = (("Glm4Moe", "glm45"), ("Glm", "glm4"), ("Qwen", "hermes"), ("Llama", "llama3"))


def pick_parser(
    setting: str, chat_template: str | None, architectures: Sequence[str]
) -> type[ToolCallParser] | None:
    """The parser class for ``setting`` (a name of :data:`PARSERS`, ``auto`` or ``none``);
    None when calls are not parsed."""
    if setting == "none":
        return None
    if setting != "auto":
        return PARSERS[setting]
    template = chat_template if isinstance(chat_template, str) else ""
    for marker, name in _TEMPLATE_MARKERS:
        if marker in template:
            return PARSERS[name]
    for architecture in architectures:
        for prefix, name in _ARCHITECTURES:
            if architecture.startswith(prefix):
                return PARSERS[name]
    return None
