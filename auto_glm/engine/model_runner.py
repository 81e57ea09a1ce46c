"""Owns the model and its paged K/V cache; runs one planned step and samples."""

from __future__ import annotations

import time

import psutil
import torch

from auto_glm.engine.config import EngineConfig
from auto_glm.engine.input_batch import prepare_input
from auto_glm.engine.plan import ModelRunnerOutput, SchedulerOutput
from auto_glm.engine.sampler import Sampler, SamplingBatch
from auto_glm.kernels import KERNEL_DTYPES, cpu_kernels
from auto_glm.layers.attention import attention_metadata
from auto_glm.models.decoder import CausalLM

__all__ = ["ModelRunner"]


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
        spec = model.spec
        self.bytes_per_block = (
            2
            * spec.num_layers
            * config.block_size
            * spec.num_kv_heads
            * spec.head_dim
            * torch.finfo(dtype).bits
            // 8
        )
        self.num_blocks = self._num_blocks(max_model_len)
        slots = self.num_blocks * config.block_size
        for attn in model.attention_layers():
            attn.k_cache = torch.zeros(
                slots, spec.num_kv_heads, spec.head_dim, dtype=dtype, device=device
            )
            attn.v_cache = torch.zeros_like(attn.k_cache)
        if device.type == "cpu":
            model.prepack(config.max_num_seqs)
            kernels = cpu_kernels() if config.cpu_kernels and dtype in KERNEL_DTYPES else None
            if kernels is not None:
                model.use_cpu_kernels(kernels)
        self.sampler = Sampler()
        self.forward_time = 0.0  # seconds inside the model's forward, to measure overhead

    def _num_blocks(self, max_model_len: int) -> int:
        cfg = self.config
        budget = cfg.kv_cache_memory
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
            else:
                free = psutil.virtual_memory().available
            budget = int(free * cfg.kv_cache_fraction)
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
    def execute(self, plan: SchedulerOutput) -> ModelRunnerOutput:
        inp = prepare_input(plan, self.config.block_size, self.device)
        t0 = time.perf_counter()
        with attention_metadata(inp.metadata):
            hidden = self.model(inp.input_ids, inp.positions)
        if not inp.sample_requests:
            self.forward_time += time.perf_counter() - t0
            return ModelRunnerOutput([], [], [])
        logits = self.model.compute_logits(hidden[inp.sample_rows]).float()
        self.forward_time += time.perf_counter() - t0
        batch = SamplingBatch.from_requests(inp.sample_requests, self.device)
        result = self.sampler(logits, batch)
        return ModelRunnerOutput(
            request_ids=[r.request_id for r in inp.sample_requests],
            sampled_token_ids=result.token_ids,
            logprobs=result.logprobs,
        )

    def release(self, request_id: str) -> None:
        """Drop per-request sampling state (seeded generators) once a request ends."""
        self.sampler.forget(request_id)
