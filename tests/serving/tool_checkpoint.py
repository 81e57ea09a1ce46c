"""A tiny checkpoint whose chat template renders tools, tool calls and tool results, and
branches on a template variable (``enable_thinking``), as GLM-4.5's and Qwen3's do."""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["TOOL_TEMPLATE", "with_tool_template"]

TOOL_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- if tools %}<|system|>\nYou may call these functions, one per <tool_call></tool_call>"
    " block:{% for t in tools %}\n{{ t.function | tojson }}{% endfor %}{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<|observation|>\n{{ m.content }}"
    "{%- elif m.role == 'assistant' %}<|assistant|>\n{{ m.content }}"
    '{%- for c in m.tool_calls or [] %}<tool_call>{"name": "{{ c.function.name }}",'
    ' "arguments": {{ c.function.arguments | tojson }}}</tool_call>{% endfor %}'
    "{%- else %}<|{{ m.role }}|>\n{{ m.content }}{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>"
    "{%- if enable_thinking is defined and not enable_thinking %}\n<think></think>{% endif %}"
    "{%- endif %}"
)


def with_tool_template(checkpoint: Path, directory: Path) -> Path:
    """A copy of ``checkpoint`` in ``directory`` with :data:`TOOL_TEMPLATE`."""
    shutil.copytree(checkpoint, directory, dirs_exist_ok=True)
    (directory / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    return directory
