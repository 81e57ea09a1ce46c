"""transformers as benchmark contenders, on the same checkpoint, dtype and threads as ours.

Every contender counts the workload's useful tokens (each request's own output length) and
checks that transformers generated exactly that many, so padded waste in static batches
costs time but never counts as output.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from auto_glm.bench.results import RunResult
from auto_glm.bench.workload import BenchRequest, Workload

if TYPE_CHECKING:  # only for hints: importing transformers' models is slow
    from transformers import PreTrainedModel

__all__ = ["HFContinuous", "HFSequential", "HFStatic", "greedy_continuations", "load_hf_model"]


def load_hf_model(
    model_dir: Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu"
) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()


@torch.inference_mode()
def greedy_continuations(
    model: PreTrainedModel, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """Each prompt's greedy continuation of exactly ``max_new_tokens`` tokens (EOS ignored),
    one prompt at a time, on the model's device: the reference our engine is compared to."""
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=model.device)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
        )
        outputs.append(out[0, len(prompt) :].tolist())
    return outputs


def _pad_id(model: PreTrainedModel) -> int:
    pad = model.generation_config.pad_token_id
    return int(pad if pad is not None else 0)


def _check(produced: int, wanted: int, who: str) -> None:
    if produced != wanted:
        raise RuntimeError(f"{who} generated {produced} tokens where {wanted} were asked for")


class HFSequential:
    """``generate`` one request at a time; ``max_requests`` times only the first requests."""

    name = "hf-seq"

    def __init__(self, model: PreTrainedModel, max_requests: int | None = None) -> None:
        self.model, self.max_requests = model, max_requests
        self.label = "transformers generate, sequential"
        if max_requests is not None:
            self.label += f" (first {max_requests} requests only)"

    def run(self, workload: Workload) -> RunResult:
        timed = workload.head(self.max_requests) if self.max_requests else workload
        start = time.perf_counter()
        for request in timed.requests:
            ids = torch.tensor([request.prompt], device=self.model.device)
            # min_new_tokens = max_new_tokens is transformers' way to ignore EOS
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=request.output_len,
                min_new_tokens=request.output_len,
                do_sample=False,
                pad_token_id=_pad_id(self.model),
            )
            _check(out.shape[1] - ids.shape[1], request.output_len, "generate")
        return RunResult(time.perf_counter() - start, len(timed.requests), timed.output_tokens)


class HFStatic:
    """``generate`` on fixed batches in arrival order, left-padded; a batch runs to its longest."""

    name = "hf-static"

    def __init__(self, model: PreTrainedModel, batch_size: int = 16) -> None:
        self.model, self.batch_size = model, batch_size
        self.label = f"transformers generate, static batches of {batch_size}"

    def run(self, workload: Workload) -> RunResult:
        requests = workload.requests
        start = time.perf_counter()
        for i in range(0, len(requests), self.batch_size):
            self._run_batch(requests[i : i + self.batch_size])
        return RunResult(time.perf_counter() - start, len(requests), workload.output_tokens)

    def _run_batch(self, batch: tuple[BenchRequest, ...]) -> None:
        width = max(len(r.prompt) for r in batch)
        pad = _pad_id(self.model)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, request in enumerate(batch):
            ids[row, width - len(request.prompt) :] = torch.tensor(request.prompt)
            mask[row, width - len(request.prompt) :] = 1
        ids, mask = ids.to(self.model.device), mask.to(self.model.device)
        longest = max(r.output_len for r in batch)
        out = self.model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=longest,
            min_new_tokens=longest,
            do_sample=False,
            pad_token_id=pad,
        )
        _check(out.shape[1] - width, longest, "static batch generate")


class HFContinuous:
    """transformers' ``ContinuousBatchingManager``, one ``add_request`` per request.

    Sized like our engine (same concurrent requests and per-step token budget) with a paged
    cache large enough for the whole workload, so it never has to evict. A fresh manager per
    run keeps its prefix cache from carrying over between runs.
    """

    name = "hf-cb"

    def __init__(
        self,
        model: PreTrainedModel,
        max_requests_per_batch: int,
        max_batch_tokens: int,
        name: str = "hf-cb",
    ) -> None:
        self.model, self.name = model, name
        self.max_requests_per_batch = max_requests_per_batch
        self.max_batch_tokens = max_batch_tokens
        self.label = (
            f"transformers ContinuousBatchingManager (max_requests_per_batch="
            f"{max_requests_per_batch}, max_batch_tokens={max_batch_tokens}, {model.dtype})"
        )

    def run(self, workload: Workload) -> RunResult:
        from transformers import ContinuousBatchingConfig, GenerationConfig

        requests = workload.requests
        page = ContinuousBatchingConfig.page_size  # keep transformers' default page size
        pages = sum(-(-(len(r.prompt) + r.output_len) // page) for r in requests)
        cb_config = ContinuousBatchingConfig(
            num_blocks=pages + len(requests),
            max_batch_tokens=self.max_batch_tokens,
            max_requests_per_batch=self.max_requests_per_batch,
        )
        # eos_token_id=-1 disables EOS, so every request generates exactly its max_new_tokens
        generation = GenerationConfig(
            do_sample=False,
            eos_token_id=-1,
            pad_token_id=_pad_id(self.model),
            max_new_tokens=max(r.output_len for r in requests),
        )
        manager = self.model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=cb_config
        )
        manager.warmup()  # allocates the paged cache now, outside the timed part
        manager.start()
        try:
            start = time.perf_counter()
            wanted = {
                manager.add_request(
                    r.prompt, max_new_tokens=r.output_len, eos_token_id=-1
                ): r.output_len
                for r in requests
            }
            produced = 0
            while wanted:
                result = manager.get_result(timeout=1)
                if result is None:
                    if not manager.is_running():
                        raise RuntimeError("transformers' continuous batching loop stopped early")
                    continue
                if not result.is_finished():
                    continue
                if result.error is not None:
                    raise RuntimeError(f"transformers' continuous batching failed: {result.error}")
                _check(
                    len(result.generated_tokens),
                    wanted.pop(result.request_id),
                    "ContinuousBatchingManager",
                )
                produced += len(result.generated_tokens)
            seconds = time.perf_counter() - start
        finally:
            manager.stop(block=True)
            manager.destroy()
        return RunResult(seconds, len(requests), produced)
