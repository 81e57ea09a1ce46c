"""An engine process on a CUDA GPU (skipped without one): the child, a fresh interpreter,
is the only process that touches CUDA, and its greedy tokens in float32 are the in-process
engine's, with CUDA graphs. It needs only what the GPU image holds (no server packages).
"""

from __future__ import annotations

import threading
from functools import partial
from pathlib import Path

import pytest
import torch

from auto_glm import GLMModel, SamplingParams
from auto_glm.cluster.process import ProcessEngineClient
from tests.reference import random_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

OPTIONS = {"max_num_seqs": 4, "kv_cache_memory": 16 << 20, "attention_backend": "triton"}
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def build_engine(path: str):
    """The engine process's build (importable: the child imports this module by name)."""
    return GLMModel(path, device="cuda", dtype="float32", cuda_graphs=True, **OPTIONS).engine


def _greedy(engine, prompts: list[list[int]]) -> list[list[int]]:
    done, outputs = threading.Semaphore(0), {}

    def sink(index: int, item) -> None:
        if isinstance(item, BaseException) or item.finished:
            outputs[index] = item
            done.release()

    for index, prompt in enumerate(prompts):
        engine.submit(prompt, GREEDY, partial(sink, index))
    for _ in prompts:
        assert done.acquire(timeout=120), "a request did not finish"
    for item in outputs.values():
        assert not isinstance(item, BaseException), item
    return [list(outputs[i].outputs.token_ids) for i in range(len(prompts))]


def test_an_engine_process_on_cuda_gives_the_in_process_engines_tokens(make_checkpoint) -> None:
    path = make_checkpoint("Qwen3ForCausalLM", seed=2, head_dim=32, num_key_value_heads=2)
    prompts = random_prompts(256, [5, 9, 3, 7], seed=4)
    model = GLMModel(str(path), device="cuda", dtype="float32", cuda_graphs=True, **OPTIONS)
    try:
        want = _greedy(model.engine, prompts)
    finally:
        model.close()
    engine = ProcessEngineClient.start(partial(build_engine, str(Path(path))), "tiny")
    try:
        assert engine.loaded.device.startswith("cuda")
        assert _greedy(engine, prompts) == want
    finally:
        engine.shutdown()
    assert engine.process.returncode == 0
