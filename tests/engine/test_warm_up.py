"""The model runner's warm-up (auto_glm.engine.warm_up): at start on a GPU, steps with 1, 2
and 16 prefill chunks and a decode beside them, so that the first requests compile no
kernel; they leave the pool, the prefix cache and the outputs as they were.

On the CPU the Triton backend runs in triton's interpreter, which compiles nothing, and the
engine does not warm up by itself; the tests call the warm-up on an idle engine and watch
the launchers it reaches. On a CUDA GPU a fresh process starts an engine and counts what
triton compiles after the start, with the warm-up and without it.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
import torch

from auto_glm import GLMModel, SamplingParams
from auto_glm.checkpoints import build_random_vision_checkpoint
from auto_glm.engine.warm_up import MIN_MODEL_LEN, warm_up_plans
from tests.engine.test_cuda_graphs import GREEDY, padded_model
from tests.reference import hf_greedy, prefix_hit_batches
from tests.triton_env import require_triton_interpreter

ARCH = "Glm4ForCausalLM"


@pytest.fixture(scope="module")
def path(make_checkpoint):
    return make_checkpoint(ARCH, seed=5, partial_rotary_factor=0.5, head_dim=16)


def test_the_plans_stay_below_min_model_len_and_in_the_pool() -> None:
    for num_blocks, block_size in [(1, 1), (3, 2), (100, 16)]:
        plans = warm_up_plans(num_blocks, block_size, vocab_size=3)
        for plan in plans:
            fed = [
                range(start, start + n)
                for start, n in zip(plan.start_positions, plan.num_scheduled_tokens, strict=True)
            ]
            assert all(pos < MIN_MODEL_LEN for positions in fed for pos in positions)
            assert all(0 <= b < num_blocks for table in plan.block_tables for b in table)
            assert all(0 <= t < 3 for r in plan.requests for t in r.all_token_ids)
            slots = [
                table[pos // block_size] * block_size + pos % block_size
                for table, positions in zip(plan.block_tables, fed, strict=True)
                for pos in positions
            ]
            assert plan.slot_mapping == slots
            # every fed token reaches its prompt's end: each request samples once
            assert all(f[-1] + 1 == r.num_tokens for f, r in zip(fed, plan.requests, strict=True))


def _watch_launchers(model: GLMModel) -> tuple[list[int], list[tuple[int, int]]]:
    """Record, per launch, the prefill's chunk count and the decode's (batch, table width);
    the launchers still run."""
    backend = model.engine.core.runner.attention_backend
    chunks: list[int] = []
    decodes: list[tuple[int, int]] = []
    prefill, decode = backend._prefill, backend._decode

    def watched_prefill(q, k_cache, v_cache, starts, seq_lens, *args):
        chunks.append(seq_lens.shape[0])
        return prefill(q, k_cache, v_cache, starts, seq_lens, *args)

    def watched_decode(q, k_cache, v_cache, tables, *args):
        decodes.append(tuple(tables.shape))
        return decode(q, k_cache, v_cache, tables, *args)

    backend._prefill, backend._decode = watched_prefill, watched_decode
    return chunks, decodes


def test_the_warm_up_launches_1_2_and_16_chunks_and_leaves_no_trace(path) -> None:
    require_triton_interpreter()
    with padded_model(path, max_num_seqs=4, max_num_batched_tokens=16) as model:
        layers = len(model.engine.loaded.model.attention_layers())
        chunks, decodes = _watch_launchers(model)
        model.engine.core.runner.warm_up()  # the engine is idle: nothing else steps
        assert chunks == [1] * layers + [2] * layers + [16] * layers
        # one decode beside the chunks, its three keys in one block of 4: no split-K
        assert decodes == [(1, 1)] * layers
        kv = model.engine.core.kv
        assert kv.pool.num_free_blocks == kv.num_blocks
        assert model.engine.stats().num_steps == 0
        # the warm-up's blocks are the first the requests get: their tokens stay exact
        vocab = model.engine.loaded.model.spec.vocab_size
        prompts, later = prefix_hit_batches(vocab)
        tokens = [r.token_ids for r in model.generate_batch(prompts, GREEDY)]
        tokens += [r.token_ids for r in model.generate_batch(later, GREEDY)]
        assert kv.prefix_cache_hits > 0
    assert tokens == hf_greedy(path, prompts + later, GREEDY.max_tokens)


def test_the_warm_up_leaves_no_non_finite_value_in_the_cache(path) -> None:
    with GLMModel(str(path), device="cpu", dtype="float32", attention_backend="torch") as model:
        model.engine.loaded.model.model.embed_tokens.weight[1] = float("nan")  # a warm-up token
        model.engine.core.runner.warm_up()
        for attn in model.engine.loaded.model.attention_layers():
            assert torch.isfinite(attn.k_cache).all() and torch.isfinite(attn.v_cache).all()
        assert model.engine.core.kv.pool.num_free_blocks == model.engine.core.kv.num_blocks


def test_a_multimodal_model_warms_up_on_text_and_answers_as_before(tmp_path) -> None:
    path = build_random_vision_checkpoint(tmp_path, seed=2)
    runs = []
    for warm in (False, True):
        with GLMModel(str(path), device="cpu", dtype="float32") as model:
            if warm:
                model.engine.core.runner.warm_up()  # M-RoPE rows of text-only prompts
            kv = model.engine.core.kv
            assert kv.pool.num_free_blocks == kv.num_blocks
            prompt = model.tokenizer.encode("a screenshot of a settings page, then")
            runs.append(model.generate_batch([prompt], GREEDY)[0].token_ids)
    assert runs[0] == runs[1]


def test_a_model_too_short_for_the_warm_up_skips_it(path) -> None:
    with GLMModel(
        str(path), device="cpu", dtype="float32", max_model_len=MIN_MODEL_LEN - 1
    ) as model:
        runner = model.engine.core.runner
        attn = model.engine.loaded.model.attention_layers()[0]
        before = attn.k_cache.clone()
        runner.warm_up()
        assert torch.equal(attn.k_cache, before)


# ---- on the CPU: the specialisations triton would build on an sm_90 GPU -----------------
@contextlib.contextmanager
def _watch_specialisations(phase: list[str]) -> Iterator[dict[str, set]]:
    """Per phase (``phase[0]`` at each launch), the (kernel, specialisation) of every
    attention kernel's launch, as triton's own binder computes it for an sm_90 target
    before it looks up or compiles a kernel (which the interpreter skips): the key of the
    kernel a GPU would run, pointers' alignment and integers' value classes included."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from auto_glm.kernels.triton import decode, prefill

    backend = make_backend(GPUTarget("cuda", 90, 32))
    seen: dict[str, set] = {}
    hooks = []
    for module in (decode, prefill):
        for name, kernel in vars(module).items():
            if not (name.endswith("kernel") and hasattr(kernel, "add_pre_run_hook")):
                continue
            jit = JITFunction(kernel.fn, **kernel.kwargs)  # its do_not_specialize included
            binder = create_function_from_signature(jit.signature, jit.params, backend)
            params = list(jit.signature.parameters)

            def hook(*args, _name=name, _binder=binder, _params=params, **kwargs):
                _, spec, _ = _binder(*args, **{k: v for k, v in kwargs.items() if k in _params})
                key = tuple(zip(_params, map(str, spec), strict=True))
                seen.setdefault(phase[0], set()).add((_name, key))

            kernel.add_pre_run_hook(hook)
            hooks.append((kernel, hook))
    try:
        yield seen
    finally:
        for kernel, hook in hooks:
            kernel.pre_run_hooks.remove(hook)


@pytest.mark.slow
def test_the_first_requests_launch_no_specialisation_the_start_did_not_build(
    make_checkpoint,
) -> None:
    """The CPU's view of the GPU test below: what the start builds on a GPU (a forward
    pass per CUDA graph's batch size, then the warm-up) against what the first requests of
    that test launch (3 tokens each rather than 6: the interpreter is slow, and the steps
    are alike), each launch keyed as triton keys its kernels. A step's widest block
    table was such a key (1, a multiple of 16, or another width: a prefill and a decode
    variant built by the first requests on the H200); it is left unspecialised now."""
    require_triton_interpreter()
    path = make_checkpoint("Qwen3ForCausalLM", seed=4, head_dim=64, num_key_value_heads=2)
    phase = ["start"]
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    options = dict(max_num_seqs=16, max_num_batched_tokens=64, max_model_len=256)
    with (
        _watch_specialisations(phase) as seen,
        padded_model(path, block_size=16, **options) as model,
    ):
        runner = model.engine.core.runner
        graphs = runner.decode_graphs
        for batch in reversed(graphs.sizes):  # what capturing the graphs runs first
            graphs.run_padding(batch)
        runner.warm_up()
        phase[0] = "requests"
        model.generate_batch([list(range(50))], params)
        model.generate_batch([list(range(5 + 5 * i)) for i in range(20)], params)
        model.generate_batch([[7, 8, 9]] * 16, params)
    kernels = {name for name, _ in seen["requests"]}
    assert "prefill_kernel" in kernels and kernels & {"decode_kernel", "decode_packed_kernel"}
    late = seen["requests"] - seen["start"]
    assert not late, "\n".join(f"{name}: {dict(key)}" for name, key in sorted(late))


# ---- on a CUDA GPU: what triton compiles after the start ---------------------------------
# In a fresh process (triton keeps what it built for the process): an engine's first
# requests, one prompt, then 20 chunked ones beside decodes, then 16 short ones in one step;
# then those of a second model, of another head_dim (kernels of its own), with no warm-up
_COMPILES_AFTER_START = textwrap.dedent(
    """
    import json, sys

    from triton import knobs

    from auto_glm import GLMModel, SamplingParams
    from auto_glm.engine.model_runner import ModelRunner

    options = dict(attention_backend="triton", max_num_seqs=16, max_num_batched_tokens=64,
                   max_model_len=256)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    compiled = {"warm": [], "cold": []}
    for path, name in zip(sys.argv[1:], compiled):
        if name == "cold":
            ModelRunner.warm_up = lambda self: None
        with GLMModel(path, device="cuda", dtype="bfloat16", **options) as model:
            knobs.runtime.jit_post_compile_hook = lambda **kw: compiled[name].append(
                f"{kw['repr']} key={kw.get('key')!r}"  # the arguments' specialisation
            )
            model.generate_batch([list(range(50))], params)
            model.generate_batch([list(range(5 + 5 * i)) for i in range(20)], params)
            model.generate_batch([[7, 8, 9]] * 16, params)
            knobs.runtime.jit_post_compile_hook = None
    print(json.dumps(compiled))
    """
)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_after_the_warm_up_the_first_requests_compile_no_kernel(make_checkpoint) -> None:
    warm, cold = (
        make_checkpoint("Qwen3ForCausalLM", seed=4, head_dim=head_dim, num_key_value_heads=2)
        for head_dim in (64, 48)
    )
    result = subprocess.run(
        [sys.executable, "-c", _COMPILES_AFTER_START, str(warm), str(cold)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    compiled = json.loads(result.stdout.strip().splitlines()[-1])
    assert compiled["warm"] == [], "\n".join(compiled["warm"])  # each with its specialisation
    # the control: without the warm-up the first requests build the prefill kernel
    assert any("prefill_kernel" in kernel for kernel in compiled["cold"]), compiled["cold"]
