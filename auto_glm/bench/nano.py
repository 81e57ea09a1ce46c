"""nano-vllm's benchmark workload, model shape and options (issue 13): ``autoglm bench
--workload nano``.

nano-vllm's ``bench.py`` seeds Python's ``random`` with 0, draws 256 prompts of 100-1024
token ids in 0-10000, then one output length in 100-1024 per request, and ignores EOS, on
Qwen3-0.6B. :func:`make_nano_workload` draws in that same order, so with the defaults it
is token for token nano-vllm's workload. The model is Qwen3-0.6B's shape with random bf16
weights, built once like the issue-3 benchmark model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auto_glm.bench.model import cached_model_path
from auto_glm.bench.workload import BenchRequest, Workload

__all__ = [
    "HF_CONTENDERS",
    "NANO_ARCHITECTURE",
    "NANO_CONFIG",
    "NANO_LENS",
    "NANO_MAX_MODEL_LEN",
    "NANO_REQUESTS",
    "NANO_TOKEN_ID_MAX",
    "NanoOptions",
    "make_nano_workload",
    "nano_model_path",
]

NANO_REQUESTS = 256
NANO_LENS = (100, 1024)  # prompt and output lengths alike, inclusive
NANO_TOKEN_ID_MAX = 10000  # prompt ids are uniform in 0..10000, inclusive
NANO_MAX_MODEL_LEN = 4096  # nano-vllm's bench.py runs with max_model_len=4096

NANO_ARCHITECTURE = "Qwen3ForCausalLM"
# Qwen3-0.6B's config.json, less what the random builder sets itself (token ids).
NANO_CONFIG: dict[str, Any] = {
    "hidden_size": 1024,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 3072,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 40960,
}
# Bump the suffix whenever NANO_CONFIG changes, so a stale cached model is not reused.
_NANO_NAME = "bench-qwen3-0.6b-v1"

HF_CONTENDERS = ("cb", "static")  # transformers' ContinuousBatchingManager, generate batches


@dataclass(frozen=True)
class NanoOptions:
    device: str = "cpu"
    requests: int = NANO_REQUESTS
    seed: int = 0
    model_dir: str | None = None
    prompt_lens: tuple[int, int] = NANO_LENS
    output_lens: tuple[int, int] = NANO_LENS
    runs: int = 1
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 16384  # nano-vllm's default
    kv_cache_memory: int | None = None  # bytes; None: the engine's share of free memory
    decode_batches: tuple[int, ...] = (1, 64, 256)
    decode_steps: int = 32
    # transformers times the first K requests; None: all; 0: none (its figure comes from
    # another run, as when one GPU session benchmarks two attention backends)
    hf_requests: int | None = 64
    attention_backend: str = "auto"  # our engine's (see auto_glm.layers.attention_backends)
    hf_contenders: tuple[str, ...] = HF_CONTENDERS  # each timed; the best is compared to ours
    static_batch_size: int = 16  # the "static" contender's batch
    threads: int = 2

    def __post_init__(self) -> None:
        checks = [
            (self.runs >= 1, "--runs", "must be >= 1"),
            (self.decode_steps >= 1, "--decode-steps", "must be >= 1"),
            (self.threads >= 1, "--threads", "must be >= 1"),
            (self.static_batch_size >= 1, "--static-batch-size", "must be >= 1"),
            (
                self.hf_requests is None or self.hf_requests >= 0,
                "--hf-requests",
                "must be >= 0 (0: transformers is not run)",
            ),
            (
                bool(self.hf_contenders)
                and set(self.hf_contenders) <= set(HF_CONTENDERS)
                and len(set(self.hf_contenders)) == len(self.hf_contenders),
                "--hf-contenders",
                f"must name one or more of {', '.join(HF_CONTENDERS)}, each once",
            ),
            (
                bool(self.decode_batches) and all(b >= 1 for b in self.decode_batches),
                "--decode-batches",
                "must be one or more batch sizes >= 1",
            ),
            (
                all(b <= self.max_num_seqs for b in self.decode_batches),
                "--decode-batches",
                f"must not exceed --max-num-seqs {self.max_num_seqs}: raise --max-num-seqs "
                "or lower the batch",
            ),
        ]
        values = {
            "--runs": self.runs,
            "--decode-steps": self.decode_steps,
            "--threads": self.threads,
            "--static-batch-size": self.static_batch_size,
            "--hf-requests": self.hf_requests,
            "--hf-contenders": " ".join(self.hf_contenders),
            "--decode-batches": " ".join(map(str, self.decode_batches)),
        }
        for ok, option, rule in checks:
            if not ok:
                raise ValueError(f"{option} {values[option]} is invalid: it {rule}")


def nano_model_path(directory: str | Path | None = None) -> Path:
    """The nano checkpoint (default ``$AUTOGLM_CACHE/bench-qwen3-0.6b-v1``)."""
    return cached_model_path(
        directory, _NANO_NAME, NANO_ARCHITECTURE, NANO_CONFIG, "nano benchmark model"
    )


def make_nano_workload(
    num_requests: int = NANO_REQUESTS,
    seed: int = 0,
    token_id_max: int = NANO_TOKEN_ID_MAX,
    prompt_lens: tuple[int, int] = NANO_LENS,
    output_lens: tuple[int, int] = NANO_LENS,
) -> Workload:
    """nano-vllm's workload: all prompts first (ids uniform in ``0..token_id_max``), then all
    output lengths, from ``random.Random(seed)``; lengths uniform in the inclusive ranges."""
    if num_requests < 1:
        raise ValueError(f"--requests {num_requests} is invalid: it must be >= 1")
    if token_id_max < 0:
        raise ValueError(f"token_id_max={token_id_max} is invalid: it must be >= 0")
    for option, (lo, hi) in (("--prompt-lens", prompt_lens), ("--output-lens", output_lens)):
        if not 1 <= lo <= hi:
            raise ValueError(f"{option} {lo} {hi} is invalid: it must satisfy 1 <= MIN <= MAX")
    rng = random.Random(seed)
    prompts = [
        [rng.randint(0, token_id_max) for _ in range(rng.randint(*prompt_lens))]
        for _ in range(num_requests)
    ]
    outputs = [rng.randint(*output_lens) for _ in range(num_requests)]
    return Workload(tuple(BenchRequest(p, n) for p, n in zip(prompts, outputs, strict=True)))
