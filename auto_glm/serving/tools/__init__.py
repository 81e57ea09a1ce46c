"""Tool calling: parsers of the models' call formats and the ``tool_choice`` policy."""

from auto_glm.serving.tools.base import ParsedCall, ParserOutput, ToolCallParser
from auto_glm.serving.tools.registry import PARSERS, pick_parser

__all__ = ["PARSERS", "ParsedCall", "ParserOutput", "ToolCallParser", "pick_parser"]
