"""Non-finite numbers: a corrupt checkpoint is refused at load, and a request whose logits
are NaN fails alone, with an error that says so, leaving no poisoned K/V behind."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from auto_glm import GLMModel, SamplingParams, cli
from auto_glm.engine.client import EngineRequestError
from tests.engine.jobs import run_together
from tests.reference import hf_greedy, random_prompts
from tests.serving.conftest import start_service, stop_service
from tests.test_loader import _overwrite_tensor

ARCH = "Glm4ForCausalLM"
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
POISON = 5  # the token whose embedding row the tests set to NaN
NON_FINITE = "the model produced non-finite logits (NaN or inf) for this request"
KERNEL_OR_TORCH = pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernels", "torch"])


@pytest.fixture(scope="module")
def path(make_checkpoint):
    return make_checkpoint(ARCH, seed=3, partial_rotary_factor=0.5, head_dim=16)


def _model(path, **options) -> GLMModel:
    return GLMModel(str(path), device="cpu", dtype="float32", **options)


def _poison_token(model: GLMModel) -> None:
    """Make every request whose prompt holds POISON compute NaN, and no other request."""
    model.engine.loaded.model.model.embed_tokens.weight[POISON] = float("nan")


def _healthy_prompts(model: GLMModel, lengths: list[int], seed: int) -> list[list[int]]:
    vocab = model.engine.loaded.model.spec.vocab_size
    return [[t for t in p if t != POISON] for p in random_prompts(vocab, lengths, seed)]


def _settled(model: GLMModel) -> bool:
    """The loop frees a request's blocks after publishing its end: wait, bounded."""
    for _ in range(200):
        stats = model.engine.stats()
        if (stats.num_running, stats.num_waiting, stats.kv_usage) == (0, 0, 0):
            return True
        time.sleep(0.01)
    return False


@KERNEL_OR_TORCH
def test_a_nan_request_fails_alone(path, kernel: bool) -> None:
    with _model(path, max_num_seqs=8, max_num_batched_tokens=32, cpu_kernels=kernel) as model:
        _poison_token(model)
        healthy = _healthy_prompts(model, [40, 7, 25], seed=1)
        bad = [POISON, *healthy[0][:20]]
        results, requests = run_together(model, [(p, GREEDY) for p in [*healthy, bad]])
        assert _settled(model)  # the failed request's blocks are free again
        # it was scheduled while the first healthy request still ran: they shared steps
        assert requests[-1].metrics.first_scheduled_time < requests[0].metrics.finished_time
        # the blocks it left behind are reused without harm
        again = model.generate_batch(healthy, GREEDY)
    failed = results.pop()
    assert isinstance(failed, EngineRequestError) and str(failed).startswith(NON_FINITE)
    expected = hf_greedy(path, healthy, GREEDY.max_tokens)
    assert [r.outputs.token_ids for r in results] == expected
    assert [r.outputs.finish_reason for r in results] == ["length"] * 3
    assert [r.token_ids for r in again] == expected


def test_retrying_the_failed_prompt_fails_again(path) -> None:
    # the failed request's first block is prefix-cached; its scrubbed K/V must not be served
    with _model(path) as model:
        _poison_token(model)
        bad = [POISON, *_healthy_prompts(model, [30], seed=2)[0]]
        for _ in range(2):
            with pytest.raises(EngineRequestError, match="non-finite logits"):
                model.generate_batch([bad], GREEDY)
            assert _settled(model)


def test_nan_weights_fail_every_api_call_explicitly(path) -> None:
    """The issue's repro: NaN in model.norm.weight gave token 0 and finish_reason "stop"."""
    with _model(path) as model:
        model.engine.loaded.model.model.norm.weight[:16] = float("nan")
        expected = rf"^{re.escape(NON_FINITE)}.*overflow even float32; re-download the model$"
        with pytest.raises(EngineRequestError, match=expected):
            model.generate("Hello", max_new_tokens=8, temperature=0)
        with pytest.raises(EngineRequestError, match=expected):  # every sampler path
            sampling = {"temperature": 0.8, "top_p": 0.9, "min_p": 0.05, "seed": 1}
            list(model.stream("Hello", max_new_tokens=8, repetition_penalty=1.2, **sampling))
        with pytest.raises(EngineRequestError, match=expected):
            model.generate_batch(["Hello", "Hi"], SamplingParams(top_k=5, logprobs=3))
        with pytest.raises(EngineRequestError, match=expected):
            model.chat([{"role": "user", "content": "Hi"}], max_new_tokens=8)
        assert _settled(model)


def test_server_answers_500_engine_error(path) -> None:
    served, thread = start_service(path)
    try:
        _poison_token(served.model)
        url = f"{served.base_url}/v1/completions"
        body = {"model": served.name, "max_tokens": 4, "temperature": 0}
        bad = httpx.post(url, json={**body, "prompt": [POISON, 7, 8]}, timeout=60)
        assert bad.status_code == 500
        error = bad.json()["error"]
        assert error["code"] == "engine_error" and error["type"] == "server_error"
        assert NON_FINITE in error["message"]
        with httpx.stream("POST", url, json={**body, "prompt": [9, POISON], "stream": True}) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert NON_FINITE in events[-2] and events[-1] == "data: [DONE]"
        good = httpx.post(url, json={**body, "prompt": [7, 8, 9]}, timeout=60)
        assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] == "length"
        served.wait_idle()
    finally:
        stop_service(served, thread)


def test_cli_refuses_a_corrupt_checkpoint(path, tmp_path: Path, capsys) -> None:
    model = Path(shutil.copytree(path, tmp_path / "model"))
    _overwrite_tensor(model / "model.safetensors", "model.norm.weight", b"\xff")
    assert cli.main(["generate", "Hi", "--model", str(model), "--dtype", "float32"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("autoglm: error: ") and "tensor model.norm.weight holds 16 NaN" in err
    assert err.endswith("the file is corrupt; re-download the model\n")


@pytest.mark.filterwarnings("ignore:float16 on the CPU is very slow")
def test_float16_overflow_names_the_fix(path, tmp_path: Path, capsys) -> None:
    # finite weights (60000 fits float16) whose activations overflow float16 arithmetic
    model = Path(shutil.copytree(path, tmp_path / "model"))
    weights = model / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], 60000.0)
    save_file(tensors, weights, metadata={"format": "pt"})
    argv = ["generate", "Hi", "--model", str(model), "--dtype", "float16", "--temperature", "0"]
    argv += ["--max-new-tokens", "4"]
    run = subprocess.run(
        [sys.executable, "-m", "auto_glm.cli", *argv, "--compute-dtype", "float16"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert f"\nautoglm: error: {NON_FINITE}" in run.stderr  # after the float16 warning
    assert "overflow the float16 compute dtype" in run.stderr
    assert "load it with compute_dtype='float32' (CLI: --compute-dtype float32)" in run.stderr
    # and the fix it names works
    assert cli.main([*argv, "--compute-dtype", "float32"]) == 0
    assert capsys.readouterr().out.strip()
