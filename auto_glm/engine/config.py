"""Engine sizing knobs, validated once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from auto_glm.engine.queue_policy import POLICIES
from auto_glm.layers.attention_backends import ATTENTION_BACKENDS
from auto_glm.layers.kv_quant import resolve_kv_cache_dtype, resolve_kv_cache_scales

__all__ = ["EngineConfig"]


@dataclass
class EngineConfig:
    """Limits of one engine.

    ``kv_cache_memory`` (bytes) sizes the block pool; when it is ``None`` the pool takes
    ``kv_cache_fraction`` of the memory that is free at start-up. ``max_model_len=None``
    means the model's ``max_position_embeddings``. ``cpu_kernels`` compiles (once per machine) and
    uses the native CPU kernels of :mod:`auto_glm.kernels` (paged decode attention, fused
    RMSNorm and SiLU); without a C++ compiler the engine warns and uses plain torch, and
    ``False`` skips them altogether. ``queue_policy`` orders competing requests (see
    :mod:`auto_glm.engine.queue_policy`): ``priority`` (then arrival), ``fcfs`` or ``fair``
    (weighted fair share of tokens between tenants). ``kv_cache_dtype`` is the K/V cache's
    precision (see :mod:`auto_glm.layers.kv_quant`): ``auto`` (the model's dtype), ``int8``
    or ``fp8_e4m3`` (about twice the tokens in the same ``kv_cache_memory``).
    ``kv_cache_scales`` is where a quantized cache's scales come from (see
    :mod:`auto_glm.engine.kv_scales`): ``dynamic`` (per token and KV head), ``calibrate``
    (per layer and KV head, measured at load: exactly twice the tokens of a bfloat16 cache)
    or ``checkpoint`` (a compressed-tensors ``kv_cache_scheme``'s, which a checkpoint that
    has one always uses).
    ``attention_backend`` computes attention (see :mod:`auto_glm.layers.attention_backends`):
    ``auto`` (the native CPU kernels on the CPU; on a CUDA GPU FlashInfer's where it is
    installed, else Triton; plain torch where those cannot run), ``torch``, ``cpu``,
    ``triton`` or ``flashinfer``. ``cuda_graphs`` replays decode-only steps from CUDA graphs
    captured at start, one per batch-size bucket (see :mod:`auto_glm.engine.cuda_graphs`),
    on a CUDA GPU with the Triton or FlashInfer backend; on the CPU
    the engine runs eagerly whatever the setting, and ``False`` runs every step eagerly.
    """

    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    kv_cache_memory: int | None = None
    kv_cache_fraction: float = 0.5
    enable_prefix_caching: bool = True
    cpu_kernels: bool = True
    queue_policy: str = "priority"
    kv_cache_dtype: str = "auto"
    kv_cache_scales: str = "dynamic"
    attention_backend: str = "auto"
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        self.kv_cache_dtype = resolve_kv_cache_dtype(self.kv_cache_dtype)
        self.kv_cache_scales = resolve_kv_cache_scales(self.kv_cache_scales, self.kv_cache_dtype)
        checks = [
            (self.block_size >= 1, "block_size", "must be >= 1"),
            (self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1"),
            (self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1"),
            (
                self.max_model_len is None or self.max_model_len >= 2,
                "max_model_len",
                "must be >= 2",
            ),
            (
                self.kv_cache_memory is None or self.kv_cache_memory > 0,
                "kv_cache_memory",
                "must be a positive number of bytes",
            ),
            (0 < self.kv_cache_fraction <= 1, "kv_cache_fraction", "must be in (0, 1]"),
            (
                self.attention_backend in ATTENTION_BACKENDS,
                "attention_backend",
                f"must be one of {', '.join(ATTENTION_BACKENDS)}",
            ),
            (
                self.queue_policy in POLICIES,
                "queue_policy",
                f"must be one of {', '.join(POLICIES)}",
            ),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: it {rule}")
