"""Two engines in one process (a server with two models, or two versions during a swap)
step on their own threads at the same time; neither may read the other's attention state."""

from __future__ import annotations

import concurrent.futures

from auto_glm.api import GLMModel
from auto_glm.sampling_params import SamplingParams

PROMPTS = [[5, 6, 7, 8, 9] * k for k in range(1, 9)]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def test_two_engines_stepping_at_once_give_their_own_results(make_checkpoint) -> None:
    models = [
        GLMModel(str(make_checkpoint(arch)), device="cpu", dtype="float32", kv_cache_memory=8 << 20)
        for arch in ("Glm4ForCausalLM", "Qwen3ForCausalLM")
    ]
    try:
        alone = [[r.token_ids for r in m.generate_batch(PROMPTS, GREEDY)] for m in models]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for _ in range(3):
                runs = pool.map(lambda m: m.generate_batch(PROMPTS, GREEDY), models)
                together = [[r.token_ids for r in results] for results in runs]
                assert together == alone
    finally:
        for model in models:
            model.close()
