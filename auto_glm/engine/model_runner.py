"""Owns the model and its paged K/V cache; runs one planned step and samples.

Logits are checked for NaN and infinity once per step, per sampled row: a row that is not
finite gets no token, and its request is reported in :attr:`StepOutput.failed` instead;
:meth:`ModelRunner.scrub_blocks` then clears what it left in the cache.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from auto_glm.engine.config import EngineConfig
from auto_glm.engine.input_batch import prepare_input
from auto_glm.engine.plan import ModelRunnerOutput, SchedulerOutput
from auto_glm.engine.sampler import Sampler, SamplingBatch
from auto_glm.engine.vision_batch import prepare_vision_input
from auto_glm.layers.attention import attention_metadata
from auto_glm.layers.attention_backends import load_cpu_kernels, select_attention_backend
from auto_glm.layers.kv_quant import kv_bytes_per_slot
from auto_glm.models.decoder import CausalLM
from auto_glm.platforms import platform_for

__all__ = ["ModelRunner", "StepOutput", "non_finite_logits_message"]

log = logging.getLogger(__name__)


def non_finite_logits_message(dtype: torch.dtype) -> str:
    """Why a request failed on non-finite logits in a model computing in ``dtype``, and the
    fix."""
    if dtype == torch.float32:
        cause = "its weights are corrupt, or its activations overflow even float32"
        fix = "re-download the model"
    else:
        name = str(dtype).removeprefix("torch.")
        cause = f"its activations overflow the {name} compute dtype, or its weights are corrupt"
        fix = (
            "load it with compute_dtype='float32' (CLI: --compute-dtype float32), or re-download it"
        )
    return (
        "the model produced non-finite logits (NaN or inf) for this request, so no token "
        f"could be sampled: {cause}; {fix}"
    )


@dataclass
class StepOutput(ModelRunnerOutput):
    """One step's sampled tokens, plus the requests whose logits were not finite: those got
    no token and must be failed (see :func:`non_finite_logits_message`)."""

    failed: list[str] = field(default_factory=list)  # request ids


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        config: EngineConfig,
        device: torch.device,
        dtype: torch.dtype,
        max_model_len: int,
    ) -> None:
        self.model, self.config, self.device, self.dtype = model, config, device, dtype
        self.platform = platform_for(device)
        spec = model.spec
        kernels, kernels_off = load_cpu_kernels(self.platform, config.cpu_kernels, dtype)
        self.attention_backend = select_attention_backend(
            config.attention_backend,
            self.platform,
            head_dim=spec.head_dim,
            kernels=kernels,
            kernels_off=kernels_off,
        )
        log.info("attention backend: %s", self.attention_backend.name)
        model.set_attention_backend(self.attention_backend)
        # K and V of every layer: values, and scales when kv_cache_dtype quantizes them
        slot_bytes = kv_bytes_per_slot(config.kv_cache_dtype, dtype, spec.head_dim)
        self.bytes_per_block = (
            2 * spec.num_layers * config.block_size * spec.num_kv_heads * slot_bytes
        )
        self.num_blocks = self._num_blocks(max_model_len)
        slots = self.num_blocks * config.block_size
        for attn in model.attention_layers():
            attn.allocate_cache(slots, dtype, config.kv_cache_dtype, device)
        if self.platform.prepacks_linear_weights:
            model.prepack(config.max_num_seqs)
        if kernels is not None:
            model.use_cpu_kernels(kernels)
        self.sampler = Sampler()
        self.forward_time = 0.0  # seconds inside the model's forward, to measure overhead

    def _num_blocks(self, max_model_len: int) -> int:
        cfg = self.config
        budget = cfg.kv_cache_memory
        if budget is None:
            budget = int(self.platform.free_memory() * cfg.kv_cache_fraction)
        blocks = budget // self.bytes_per_block
        if blocks < 1:
            raise ValueError(
                f"kv_cache_memory={budget} bytes holds no KV block (one block needs "
                f"{self.bytes_per_block} bytes); raise kv_cache_memory"
            )
        if cfg.kv_cache_memory is None:
            # a fraction of free memory can dwarf what max_num_seqs full-length sequences use
            per_seq = -(-max_model_len // cfg.block_size)
            blocks = min(blocks, cfg.max_num_seqs * per_seq)
        return int(blocks)

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> StepOutput:
        inp = prepare_input(plan, self.attention_backend, self.config.block_size, self.device)
        t0 = time.perf_counter()
        with attention_metadata(inp.metadata):
            if self.model.accepts_images:
                vis = prepare_vision_input(plan, inp.order, self.model, self.device)
                hidden = self.model(inp.input_ids, vis.positions, vis.image_embeds, vis.image_rows)
            else:
                hidden = self.model(inp.input_ids, inp.positions)
        if not inp.sample_requests:
            self.forward_time += time.perf_counter() - t0
            return StepOutput([], [], [])
        logits = self.model.compute_logits(hidden[inp.sample_rows]).float()
        self.platform.synchronize()  # a GPU runs ahead of the host: time the work, not its launch
        self.forward_time += time.perf_counter() - t0
        # a NaN or inf anywhere in a row makes its sum NaN or inf (finite logits are far too
        # small to overflow float32): one pass, 20-40x cheaper on the CPU than isfinite().all()
        finite = torch.isfinite(logits.sum(dim=-1))  # [B]
        batch = SamplingBatch.from_requests(inp.sample_requests, self.device)
        result = self.sampler(logits, batch)
        # read after sampling, which has waited for the device already: no extra stall
        out = StepOutput([], [], [])
        rows = zip(
            inp.sample_requests, finite.tolist(), result.token_ids, result.logprobs, strict=True
        )
        for request, ok, token, logprobs in rows:
            if ok:
                out.request_ids.append(request.request_id)
                out.sampled_token_ids.append(token)
                out.logprobs.append(logprobs)
            else:
                out.failed.append(request.request_id)
        return out

    @torch.inference_mode()
    def scrub_blocks(self, block_ids: list[int]) -> list[int]:
        """Replace NaN and infinity in these blocks' K/V with zeros; return the blocks that
        held any.

        A non-finite value poisons every later reader of its slot, even behind the
        attention mask (0 * NaN is NaN), so the blocks a failed request leaves behind must
        not keep them. Finite values are left as they are. In a quantized cache the scales
        carry the non-finite values (see :mod:`auto_glm.layers.kv_quant`): a non-finite
        scale becomes zero, and so does its slot's head.
        """
        if not block_ids:
            return []
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        dirty = torch.zeros(len(block_ids), dtype=torch.bool, device=self.device)
        for attn in self.model.attention_layers():
            for cache in attn.non_finite_carriers():
                blocks = cache.view(-1, self.config.block_size, *cache.shape[1:])
                part = blocks.index_select(0, ids)
                finite = torch.isfinite(part).flatten(1).all(dim=1)  # [len(block_ids)]
                if not bool(finite.all()):
                    blocks.index_copy_(0, ids, part.nan_to_num_(0.0, 0.0, 0.0))
                    dirty |= ~finite
        return [b for b, bad in zip(block_ids, dirty.tolist(), strict=True) if bad]

    def release(self, request_id: str) -> None:
        """Drop per-request sampling state (seeded generators) once a request ends."""
        self.sampler.forget(request_id)
