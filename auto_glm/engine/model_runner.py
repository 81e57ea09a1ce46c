"""Owns the model and its paged K/V cache; runs one planned step and samples.

Logits are checked for NaN and infinity once per step, per sampled row: a row that is not
finite gets no token, and its request is reported in :attr:`StepOutput.failed` instead;
:meth:`ModelRunner.scrub_blocks` then clears what it left in the cache.

With ``cuda_graphs`` on the Triton or FlashInfer backend, decode-only steps run through the
padded persistent buffers of :mod:`auto_glm.engine.cuda_graphs`: replayed from CUDA graphs
where the platform has them, else eagerly (the CPU, under Triton's interpreter, in tests).
That path needs a pad block, one block of the KV memory that the block pool never hands out.

Where the platform builds kernels on their first launch (a GPU), the runner then runs the
steps of :mod:`auto_glm.engine.warm_up` before it takes requests.

:meth:`ModelRunner.launch` hands a step to the device and starts the copy of its tokens
back; :meth:`LaunchedStep.result` waits for them. In between, the engine core may plan and
launch the next decode step, which takes those tokens on the device (``feed``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from auto_glm.engine.config import EngineConfig
from auto_glm.engine.cuda_graphs import DecodeGraphRunner
from auto_glm.engine.input_batch import ModelInput, prepare_input
from auto_glm.engine.plan import ModelRunnerOutput, SchedulerOutput
from auto_glm.engine.request import Request
from auto_glm.engine.sampler import SampledRows, Sampler, SamplingBatch
from auto_glm.engine.vision_batch import prepare_vision_input
from auto_glm.engine.warm_up import MIN_MODEL_LEN, warm_up_plans
from auto_glm.layers.attention import attention_metadata
from auto_glm.layers.attention_backends import (
    AttentionBackend,
    load_cpu_kernels,
    select_attention_backend,
)
from auto_glm.layers.kv_quant import kv_bytes_per_slot
from auto_glm.models.decoder import CausalLM
from auto_glm.platforms import HostCopy, WallTimer, platform_for, tensor_on

__all__ = [
    "LaunchedStep",
    "ModelRunner",
    "StepOutput",
    "decode_graphs_off_reason",
    "non_finite_logits_message",
]

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


def decode_graphs_off_reason(
    config: EngineConfig, backend: AttentionBackend, model: CausalLM, max_len: int
) -> str | None:
    """None where decode steps take the padded path of :mod:`auto_glm.engine.cuda_graphs`
    (replayed from graphs where the platform has them, else run eagerly: ``cuda_graphs=True``
    on the CPU), else why not."""
    if not config.cuda_graphs:
        return "cuda_graphs=False"
    if not backend.supports_decode_graphs:
        return f"they need attention_backend='triton' or 'flashinfer', not {backend.name!r}"
    if model.language_model().rotary_emb.reserved < max_len:
        return "dynamic rope past the trained length reads the positions back from the device"
    return None


def _nothing() -> None:
    return None


def _rows_in(step: LaunchedStep, requests: list[Request]) -> list[int]:
    """Each request's row in ``step``'s sampled tokens."""
    rows = {request_id: row for row, request_id in enumerate(step.request_ids)}
    return [rows[r.request_id] for r in requests]


@dataclass
class StepOutput(ModelRunnerOutput):
    """One step's sampled tokens, plus the requests whose logits were not finite: those got
    no token and must be failed (see :func:`non_finite_logits_message`)."""

    failed: list[str] = field(default_factory=list)  # request ids


@dataclass
class LaunchedStep:
    """A step handed to the device: its sampled tokens, in ``request_ids`` order, are read
    back by :meth:`result`. ``tokens`` stays on the device for a step planned ahead.

    A step planned ahead with a grammar row launches its forward pass only: a grammar masks
    the next token from the tokens before it, which the host has not appended yet. Its
    sampling waits for :meth:`sample_deferred`, once they are."""

    request_ids: list[str]  # [B] the sampling requests
    tokens: torch.Tensor | None  # [B] int64 on the device; None when nothing samples
    _rows: SampledRows | None
    _copy: HostCopy | None
    _deferred: Callable[[], LaunchedStep] | None = None  # the sampling held back
    # times the wait for the tokens in result(): the runner's, where the step samples
    _wait_timer: WallTimer = field(default_factory=WallTimer)

    def sample_deferred(self) -> None:
        """Launch the sampling held back, now that the step before's tokens are appended (and
        its grammars have taken them); nothing where none was."""
        if self._deferred is not None:
            sampled, self._deferred = self._deferred(), None
            self.tokens, self._rows, self._copy = sampled.tokens, sampled._rows, sampled._copy
            self._wait_timer = sampled._wait_timer

    def result(self) -> StepOutput:
        """Wait for the tokens; fail the rows whose logits were not finite."""
        if self._deferred is not None:
            raise RuntimeError("this step's sampling was held back: call sample_deferred first")
        out = StepOutput([], [], [])
        if self._rows is None or self._copy is None:
            return out
        self._wait_timer.start()
        host = self._copy.wait()
        self._wait_timer.stop()
        result = self._rows.read(host)
        rows = zip(self.request_ids, result.finite, result.token_ids, result.logprobs, strict=True)
        for request_id, ok, token, logprobs in rows:
            if ok:
                out.request_ids.append(request_id)
                out.sampled_token_ids.append(token)
                out.logprobs.append(logprobs)
            else:
                out.failed.append(request_id)
        return out


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        config: EngineConfig,
        device: torch.device,
        dtype: torch.dtype,
        max_model_len: int,
        weight_dtype: torch.dtype | None = None,
    ) -> None:
        """``dtype``: the model's compute dtype; ``weight_dtype``: its checkpoint's, rounded
        to on loading (``LoadedModel.weight_dtype``), which decides how CPU weights are packed
        (:meth:`CausalLM.prepack`)."""
        self.model, self.config, self.device, self.dtype = model, config, device, dtype
        self.platform = platform_for(device)
        spec = model.spec
        kernels, kernels_off = load_cpu_kernels(self.platform, config.cpu_kernels, dtype)
        self.attention_backend = select_attention_backend(
            config.attention_backend,
            self.platform,
            head_dim=spec.head_dim,
            dtype=dtype,
            kv_cache_dtype=config.kv_cache_dtype,
            kernels=kernels,
            kernels_off=kernels_off,
        )
        log.info("attention backend: %s", self.attention_backend.name)
        model.set_attention_backend(self.attention_backend)
        # K and V of every layer: values, and per-slot scales when kv_cache_dtype quantizes
        # them with kv_cache_scales='dynamic'
        static = config.kv_cache_scales != "dynamic"
        slot_bytes = kv_bytes_per_slot(config.kv_cache_dtype, dtype, spec.head_dim, static)
        self.bytes_per_block = (
            2 * spec.num_layers * config.block_size * spec.num_kv_heads * slot_bytes
        )
        # no position read back from the device per step (M-RoPE's too: none passes its
        # token's index)
        model.language_model().rotary_emb.reserve(max_model_len)
        off = decode_graphs_off_reason(config, self.attention_backend, model, max_model_len)
        pad_blocks = 1 if off is None else 0  # past the pool's blocks: padding rows' K/V
        self.num_blocks = self._num_blocks(max_model_len, pad_blocks)
        slots = (self.num_blocks + pad_blocks) * config.block_size
        for attn in model.attention_layers():
            attn.allocate_cache(slots, dtype, config.kv_cache_dtype, device)
        if kernels is not None:  # first: a w8a8 layer packs for the AMX kernel if it has it
            model.use_cpu_kernels(kernels)
        fused = self.platform.fused_kernels(dtype)
        if fused is not None:
            model.use_fused_kernels(fused)
        if self.platform.prepacks_linear_weights:
            model.prepack(config.max_num_seqs, dtype, weight_dtype)
        self.sampler = Sampler()
        self._last_batch: SamplingBatch | None = None
        self._timer = self.platform.step_timer()
        self._wait_timer = WallTimer()
        # called once per step, as soon as its forward pass is handed to the device and
        # before the step waits for it (the engine core delivers the previous step's outputs
        # there, so that their detokenization overlaps the device's work)
        self.after_launch: Callable[[], None] = _nothing
        self.decode_graphs: DecodeGraphRunner | None = None
        # read every step: the decode benchmark turns it off to time the eager step
        self.use_decode_graphs = off is None
        if off is None:
            replay = "graph" if self.platform.supports_cuda_graphs else "eager"
            self.decode_graphs = DecodeGraphRunner(
                model,
                self.attention_backend,
                max_num_seqs=config.max_num_seqs,
                max_blocks=-(-max_model_len // config.block_size),
                block_size=config.block_size,
                pad_block=self.num_blocks,
                device=device,
                dtype=dtype,
                replay=replay,
            )
            self.decode_graphs.capture()
            sizes = self.decode_graphs.sizes
            log.info("decode steps: padded to %d batch sizes, replay %s", len(sizes), replay)
        else:
            log.info("decode steps: eager, without CUDA graphs (%s)", off)
        self.max_model_len = max_model_len
        if self.platform.compiles_kernels_on_first_use:
            self.warm_up()

    def warm_up(self) -> None:
        """Run the steps of :mod:`auto_glm.engine.warm_up` on the idle pool, so that the
        kernels of steps with prefill chunks are compiled now (a no-op for a
        ``max_model_len`` too short for them)."""
        if self.max_model_len < MIN_MODEL_LEN:
            return
        start = time.perf_counter()
        spec = self.model.spec
        plans = warm_up_plans(self.num_blocks, self.config.block_size, spec.vocab_size)
        for plan in plans:
            self.execute(plan)  # its tokens go nowhere; a row not finite fails nothing
        self.scrub_blocks(
            sorted({block for plan in plans for t in plan.block_tables for block in t})
        )
        log.info(
            "warm-up: %d steps with prefill chunks in %.1f s",
            len(plans),
            time.perf_counter() - start,
        )

    def close(self) -> None:
        """Release the CUDA graphs (the engine loop has stopped; see
        :meth:`DecodeGraphRunner.release`)."""
        if self.decode_graphs is not None:
            self.decode_graphs.release()
            self.decode_graphs = None

    @property
    def forward_time(self) -> float:
        """Seconds inside the model's forward passes so far, to measure the overhead around
        them; on a GPU, device time read without waiting (steps still running count later)."""
        return self._timer.total()

    @property
    def wait_time(self) -> float:
        """Seconds the host waited for sampled tokens to come back from the device so far
        (on the CPU, which computes as the host runs, about 0)."""
        return self._wait_timer.total()

    def _num_blocks(self, max_model_len: int, pad_blocks: int) -> int:
        """Blocks for the pool: what the budget holds less ``pad_blocks`` kept back."""
        cfg = self.config
        budget, free = cfg.kv_cache_memory, self.platform.free_memory()
        if budget is None:
            budget = int(free * cfg.kv_cache_fraction)
        elif budget > free:  # checked here: allocating it fails with a bare allocator error
            raise ValueError(
                f"kv_cache_memory={budget} bytes ({budget / 2**30:.1f} GiB) is more than the "
                f"{free / 2**30:.1f} GiB free on {self.device} now that the model is loaded; "
                "lower kv_cache_memory, or leave it unset to take "
                f"{cfg.kv_cache_fraction:.0%} of the free memory"
            )
        blocks = budget // self.bytes_per_block - pad_blocks
        if blocks < 1:
            padding = f", plus {pad_blocks} pad block for CUDA graphs" if pad_blocks else ""
            raise ValueError(
                f"kv_cache_memory={budget} bytes holds no KV block (one block needs "
                f"{self.bytes_per_block} bytes{padding}); raise kv_cache_memory"
            )
        if cfg.kv_cache_memory is None:
            # a fraction of free memory can dwarf what max_num_seqs full-length sequences use
            per_seq = -(-max_model_len // cfg.block_size)
            blocks = min(blocks, cfg.max_num_seqs * per_seq)
        return int(blocks)

    def execute(self, plan: SchedulerOutput) -> StepOutput:
        """Run one planned step and read its tokens back."""
        return self.launch(plan).result()

    @property
    def max_ahead_batch(self) -> int:
        """The most requests a step planned ahead (:meth:`Scheduler.schedule_ahead`) may
        hold: the padded decode path's largest batch, 0 where that path is off. Such a step
        takes the tokens in flight on the device, on the padded path where it only decodes,
        else on the eager one."""
        graphs = self.decode_graphs
        return graphs.sizes[-1] if graphs is not None and self.use_decode_graphs else 0

    @torch.inference_mode()
    def launch(self, plan: SchedulerOutput, feed: LaunchedStep | None = None) -> LaunchedStep:
        """Hand one planned step to the device, sampling included; the host waits only in
        :meth:`LaunchedStep.result`. A plan that ``feeds_pending`` takes the tokens in flight
        from ``feed``, the step launched before it, on the device (see
        :attr:`max_ahead_batch`); a plan with a grammar row among those holds its sampling
        back (:meth:`LaunchedStep.sample_deferred`)."""
        if plan.feeds_pending and feed is None:
            raise ValueError("a plan made ahead needs the step it follows")
        graphs = self.decode_graphs
        if graphs is not None and self.use_decode_graphs and graphs.fits(plan):
            fed = None
            if plan.feeds_pending:
                fed = (feed.tokens, _rows_in(feed, plan.requests))
            self._timer.start()
            logits = graphs.run(plan, fed)  # [B, V] model dtype, plan order: all sample
            self._timer.stop()
            self.after_launch()
            pending = graphs.fed_tokens(len(plan.requests)) if fed is not None else None
            return self._launch_sampling(logits, plan.requests, pending, None)
        inp = prepare_input(plan, self.attention_backend, self.config.block_size, self.device)
        pending = pending_rows = None
        if inp.pending_rows:
            pending, pending_rows = self._feed(inp, feed), inp.pending_samples
        self._timer.start()
        with attention_metadata(inp.metadata):
            if self.model.accepts_images:
                vis = prepare_vision_input(plan, inp.order, self.model, self.device)
                hidden = self.model(inp.input_ids, vis.positions, vis.image_embeds, vis.image_rows)
            else:
                hidden = self.model(inp.input_ids, inp.positions)
        if not inp.sample_requests:
            self._timer.stop()
            self.after_launch()
            return LaunchedStep([], None, None, None)
        logits = self.model.compute_logits(hidden[inp.sample_rows])  # [B, V] model dtype
        self._timer.stop()
        self.after_launch()
        return self._launch_sampling(logits, inp.sample_requests, pending, pending_rows)

    def _feed(self, inp: ModelInput, feed: LaunchedStep | None) -> torch.Tensor:
        """Gather the tokens in flight from ``feed`` into ``inp.input_ids`` on the device;
        returns them ``[P]``, in ``inp.pending_samples`` order."""
        if feed is None or feed.tokens is None:
            raise ValueError("a plan made ahead needs the step it follows, with its tokens")
        requests = [inp.sample_requests[i] for i in inp.pending_samples]
        count = len(requests)
        index = tensor_on([*inp.pending_rows, *_rows_in(feed, requests)], torch.long, self.device)
        tokens = feed.tokens.index_select(0, index[count:]).long()  # [P]
        inp.input_ids.index_copy_(0, index[:count], tokens)
        return tokens

    @torch.inference_mode()  # also when a held-back sampling runs after the launch
    def _launch_sampling(
        self,
        logits: torch.Tensor,
        requests: list[Request],
        pending: torch.Tensor | None,
        pending_rows: list[int] | None,
    ) -> LaunchedStep:
        """Sample ``logits`` [B, V] (the model's dtype), one row per request, and start
        reading the tokens back; ``pending`` [P] on the device: the tokens not yet appended,
        of the rows ``pending_rows`` (None: every row), in a step planned ahead.

        With tokens in flight and a grammar row, the sampling is held back
        (:meth:`LaunchedStep.sample_deferred`): a grammar masks from the tokens on the host.
        The logits stay as they are until it runs: the graphs' buffer is next written by the
        step after, which follows it (EngineCore.step)."""
        if pending is not None and any(r.grammar is not None for r in requests):
            sample = partial(self._launch_sampling, logits, requests, None, None)
            return LaunchedStep([r.request_id for r in requests], None, None, None, sample)
        batch = SamplingBatch.from_requests(
            requests, self.device, pending, pending_rows, self._last_batch
        )
        self._last_batch = batch  # the next step's, if it holds the same requests
        rows = self.sampler.sample(logits, batch)
        copy = self.platform.copy_to_host(rows.packed)  # the step's one device-to-host copy
        ids = [r.request_id for r in requests]
        return LaunchedStep(ids, rows.tokens, rows, copy, _wait_timer=self._wait_timer)

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
            dirty |= attn.scrub_blocks(ids, self.config.block_size)
        return [b for b, bad in zip(block_ids, dirty.tolist(), strict=True) if bad]
