"""A small GLM-4-style byte-level BPE tokenizer, trained deterministically offline."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from auto_glm.checkpoints.corpus import corpus_lines

__all__ = [
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "EXTRA_EOS_TOKENS",
    "SPECIAL_TOKENS",
    "build_tokenizer",
]

EOS_TOKEN = "<|endoftext|>"
# GLM-4 also stops when the model starts a new user or tool turn.
EXTRA_EOS_TOKENS = ("<|user|>", "<|observation|>")
SPECIAL_TOKENS = (
    EOS_TOKEN,
    "[MASK]",
    "[gMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)
# Every byte is a base token, so any text (any language, any emoji) can be encoded.

# GLM-4 layout: "[gMASK]<sop>" once, then "<|role|>\n" + content per turn; "tool" is an
# alias of GLM's "observation" role so OpenAI-style tool messages render.
CHAT_TEMPLATE = (
    "{%- set tags = {'system': '<|system|>', 'user': '<|user|>', 'assistant': '<|assistant|>',"
    " 'observation': '<|observation|>', 'tool': '<|observation|>'} -%}"
    "[gMASK]<sop>"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in tags -%}"
    "{{ raise_exception('unsupported chat role ' ~ message['role']"
    " ~ '; use system, user, assistant or tool') }}"
    "{%- endif -%}"
    "{{ tags[message['role']] }}\n{{ message['content'] }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def build_tokenizer(
    directory: str | Path,
    vocab_size: int = 1024,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    chat_template: str = CHAT_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """Train the tokenizer, save it in Hugging Face format into ``directory``, return it.

    The learned vocabulary can be smaller than ``vocab_size`` when the built-in corpus
    runs out of merges; ``len(tokenizer)`` is the real size. Same inputs give the same
    ``tokenizer.json`` bytes. ``special_tokens`` (which must include ``EOS_TOKEN``) take
    the first ids, in order; other model families pass their own list and template.
    """
    if EOS_TOKEN not in special_tokens:
        raise ValueError(f"special_tokens must include the end-of-text token {EOS_TOKEN!r}")
    min_vocab = 256 + len(special_tokens)
    if vocab_size < min_vocab:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level tokenizer needs at least "
            f"{min_vocab} ids (256 bytes + {len(special_tokens)} special tokens)"
        )
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(corpus_lines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=[t for t in special_tokens if t != EOS_TOKEN],
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(str(directory))
    return tokenizer
