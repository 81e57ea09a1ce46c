"""Builders of real Hugging Face format checkpoints with random weights.

Used by the demo model, the tests and the benchmarks: the files are the same kind a
downloaded model has, so they go through the same loader.
"""

from auto_glm.checkpoints.demo import DEMO_ARCHITECTURE, DEMO_CONFIG, demo_model_path
from auto_glm.checkpoints.random_model import ARCHITECTURE_CONFIGS, build_random_checkpoint
from auto_glm.checkpoints.random_vision import (
    VISION_CHAT_TEMPLATE,
    VISION_SPECIAL_TOKENS,
    build_random_vision_checkpoint,
)
from auto_glm.checkpoints.tokenizer import (
    CHAT_TEMPLATE,
    EOS_TOKEN,
    EXTRA_EOS_TOKENS,
    SPECIAL_TOKENS,
    build_tokenizer,
)

__all__ = [
    "ARCHITECTURE_CONFIGS",
    "CHAT_TEMPLATE",
    "DEMO_ARCHITECTURE",
    "DEMO_CONFIG",
    "EOS_TOKEN",
    "EXTRA_EOS_TOKENS",
    "SPECIAL_TOKENS",
    "VISION_CHAT_TEMPLATE",
    "VISION_SPECIAL_TOKENS",
    "build_random_checkpoint",
    "build_random_vision_checkpoint",
    "build_tokenizer",
    "demo_model_path",
]
