"""``autoglm bench --workload nano`` (issue 13): nano-vllm's workload, and the whole benchmark
at tiny scale on the CPU with every field of its report; the decode kernel's sweep in
triton's interpreter."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from auto_glm.bench.cli import main
from auto_glm.bench.nano import NanoOptions, make_nano_workload
from auto_glm.bench.nano_report import format_nano_report
from auto_glm.bench.nano_runner import run_nano
from auto_glm.kernels.triton.tiles import read_tuned_tiles

REPO = Path(__file__).resolve().parent.parent
TINY_QWEN3 = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "tie_word_embeddings": True,
}


def test_nano_workload_is_nano_vllms_by_default() -> None:
    workload = make_nano_workload()
    assert len(workload.requests) == 256 and NanoOptions().requests == 256
    for request in workload.requests:
        assert 100 <= len(request.prompt) <= 1024 and 100 <= request.output_len <= 1024
        assert all(0 <= t <= 10000 for t in request.prompt)
    assert workload == make_nano_workload(seed=0)
    assert workload != make_nano_workload(seed=1)
    # nano-vllm's bench.py, draw for draw: seed(0), all prompts, then all max_tokens
    rng = random.Random(0)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(256)]
    outputs = [rng.randint(100, 1024) for _ in range(256)]
    assert [r.prompt for r in workload.requests] == prompts
    assert [r.output_len for r in workload.requests] == outputs


def test_nano_workload_refuses_bad_ranges_by_option_name() -> None:
    with pytest.raises(ValueError, match=r"--prompt-lens 9 3 is invalid"):
        make_nano_workload(4, prompt_lens=(9, 3))
    with pytest.raises(ValueError, match=r"--requests 0 is invalid"):
        make_nano_workload(0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ("--workload nano --only ours", "--only: for --workload issue3 only"),
        ("--decode-steps 4", "--decode-steps: for --workload nano only"),
        ("--attention-backend torch", "--attention-backend: for --workload nano only"),
        (
            "--workload nano --max-num-seqs 4 --decode-batches 1 8",
            "--decode-batches 1 8 is invalid: it must not exceed --max-num-seqs 4",
        ),
        (
            "--workload nano --hf-requests -1",
            "--hf-requests -1 is invalid: it must be >= 0 (0: transformers is not run)",
        ),
        (
            "--workload nano --hf-contenders cb cb",
            "--hf-contenders cb cb is invalid: it must name one or more of cb, static, each once",
        ),
        ("--hf-contenders static", "--hf-contenders: for --workload nano only"),
    ],
)
def test_bench_refuses_options_of_the_other_workload(
    argv: str, message: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(argv.split()) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ("--device tpu", "unknown device 'tpu'; use one of: auto, cpu, cuda, cuda:N"),
        ("--workload nano --json /nonexistent/x.json", "its folder /nonexistent does not exist"),
        ("--quick --json /nonexistent/x.json", "--json /nonexistent/x.json: its folder"),
    ],
)
def test_bench_refuses_a_device_or_report_path_before_it_runs(
    argv: str, message: str, capsys: pytest.CaptureFixture
) -> None:
    # the report path failed only after the whole run; the device with a traceback
    assert main(argv.split()) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# device_count, not is_available: gpu_check.sh's test step takes the files that check the
# latter for the tests that need a GPU, and this one needs there to be none
@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="needs a machine without a GPU")
def test_bench_on_cuda_without_a_gpu_says_so(capsys: pytest.CaptureFixture) -> None:
    assert main(["--workload", "nano", "--device", "cuda"]) == 1
    assert "device 'cuda' requested but no CUDA GPU is available" in capsys.readouterr().err


def test_nano_bench_at_tiny_scale_reports_every_field(
    make_checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model = make_checkpoint("Qwen3ForCausalLM", dtype=torch.bfloat16, **TINY_QWEN3)
    out = tmp_path / "nano.json"
    argv = (
        f"--workload nano --device cpu --model-dir {model} --requests 4 --prompt-lens 8 16 "
        "--output-lens 4 8 --max-num-seqs 4 --max-num-batched-tokens 64 --kv-cache-mib 4 "
        "--decode-batches 1 3 --decode-steps 3 --hf-requests 2 --attention-backend torch "
        f"--threads {torch.get_num_threads()} --json {out}"
    )
    assert main(argv.split()) == 0
    report = json.loads(out.read_text())

    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    workload = make_nano_workload(4, 0, min(10000, vocab - 1), (8, 16), (4, 8))
    assert report["workload"]["output_tokens"] == workload.output_tokens
    assert report["workload"]["prompt_tokens"] == workload.prompt_tokens
    assert report["model"]["architecture"] == "Qwen3ForCausalLM"
    assert report["model"]["weight_bytes"] >= report["model"]["parameters"] * 2
    assert report["machine"]["device"] == "cpu" and report["machine"]["copy_bandwidth"] > 0
    start = report["startup"]
    assert start["engine_start_s"] > 0 and 0 < start["first_token_s"] <= start["first_request_s"]
    assert start["first_request_tokens"] == min(16, workload.requests[0].output_len)
    (ours,) = report["ours"]["runs"]
    assert ours["output_tokens"] == workload.output_tokens and ours["tokens_per_s"] > 0
    assert ours["steps"] >= max(r.output_len for r in workload.requests)
    assert ours["steps_ahead"] == 0  # the CPU plans each step after the last one's tokens
    assert 0 <= ours["gc_s"] < ours["seconds"]
    # both transformers contenders on the same two requests; ours is compared to the faster
    contenders = report["transformers_contenders"]
    assert [c["name"] for c in contenders] == ["hf-cb", "hf-static"]
    for contender in contenders:
        (hf,) = contender["runs"]
        assert hf["requests"] == 2 and hf["output_tokens"] == workload.head(2).output_tokens
    best = max(contenders, key=lambda c: c["median_tokens_per_s"])
    assert report["transformers"] == best
    ours_rate = report["ours"]["median_tokens_per_s"]
    assert report["ratio"] == pytest.approx(ours_rate / best["median_tokens_per_s"])
    assert [d["batch"] for d in report["decode"]] == [1, 3]
    # on the CPU, steps are neither replayed from graphs nor planned ahead: nothing to compare
    assert report["engine"]["overlap_steps"] is False
    assert report["engine"]["attention_backend"] == "torch"  # not the CPU's default, "cpu"
    assert report["decode_eager"] == report["decode_in_turn"] == []
    for step in report["decode"]:
        assert step["steps"] >= 3 and step["step_s"] > 0 and step["engine_step_s"] > 0
        assert 12 <= step["context_tokens"] < 12 + 64  # prompt (8+16)//2, then a few tokens
        assert step["kv_bytes"] > 0 and step["weight_bytes"] == report["model"]["weight_bytes"]
        assert step["floor_s"] > 0 and step["floor_ratio"] == step["step_s"] / step["floor_s"]
        # the loop waited on tokens within the step, and the output thread detokenized them
        assert 0 <= step["wait_s"] < step["engine_step_s"] and step["output_s"] > 0
        assert 0 <= step["gc_s"] < step["step_s"]  # collections in the window, if any

    printed = capsys.readouterr().out
    for text in (
        "copy bandwidth",
        "first request after start",
        "output tokens/s, ours",
        f"run 1, ours: {ours['steps']} engine steps, 0 of them (0%) planned and launched",
        f"garbage collections held it {ours['gc_s'] * 1e3:.0f} ms in all",
        "output tokens/s, transformers (hf-cb)",
        "output tokens/s, transformers (hf-static)",
        f"ours / transformers' best ({best['name']})",
        "| decode batch |",
        "| output thread (ms) | gc (ms) |",
        "step / floor",
        "attention: torch",
    ):
        assert text in printed

    # what only a GPU report holds (graphs, steps planned ahead, and the same steps planned in
    # turn and run eagerly) prints too, each row against the overlapped step of its batch
    slower = [{**step, "step_s": 2 * step["step_s"], "floor_ratio": 2 * step["floor_ratio"]}
              for step in report["decode"]]  # fmt: skip
    report["engine"] |= {"cuda_graphs": True, "overlap_steps": True}
    gpu = format_nano_report(report | {"decode_in_turn": slower, "decode_eager": slower})
    assert "decode steps: CUDA graphs, each planned and launched while the one before runs" in gpu
    assert gpu.count("one's tokens are read: ") == 2 and gpu.count("2.00x the overlapped step") == 2
    assert gpu.count("2.00x the step with graphs") == 2


def test_nano_bench_without_transformers(make_checkpoint, tmp_path: Path, capsys) -> None:
    """``--hf-requests 0``: our engine only (as for a second attention backend in one GPU
    session), and the report says transformers was not run."""
    model = make_checkpoint("Qwen3ForCausalLM", dtype=torch.bfloat16, **TINY_QWEN3)
    out = tmp_path / "nano.json"
    argv = (
        f"--workload nano --device cpu --model-dir {model} --requests 2 --prompt-lens 8 16 "
        "--output-lens 4 8 --max-num-seqs 2 --max-num-batched-tokens 64 --kv-cache-mib 4 "
        f"--decode-batches 2 --decode-steps 2 --hf-requests 0 --json {out}"
    )
    assert main(argv.split()) == 0
    report = json.loads(out.read_text())
    assert report["transformers"] is None and report["ratio"] is None
    assert report["transformers_contenders"] == [] and report["complete"] is True
    assert report["ours"]["runs"][0]["tokens_per_s"] > 0
    printed = capsys.readouterr().out
    assert "output tokens/s, transformers: not run (--hf-requests 0)" in printed
    assert "ours / transformers" not in printed


def test_nano_bench_hands_over_our_figures_before_transformers_runs(make_checkpoint) -> None:
    """A GPU session's benchmark runs under a time limit, with transformers last: the report
    of our engine alone is handed over (and written, with --json) before transformers
    starts, marked incomplete, so a run stopped during transformers keeps our figures."""
    model = make_checkpoint("Qwen3ForCausalLM", dtype=torch.bfloat16, **TINY_QWEN3)
    options = NanoOptions(
        model_dir=str(model), requests=2, prompt_lens=(8, 16), output_lens=(4, 8),
        max_num_seqs=2, max_num_batched_tokens=64, kv_cache_memory=4 << 20,
        decode_batches=(2,), decode_steps=2, hf_requests=2, hf_contenders=("static",),
    )  # fmt: skip
    handed: list[dict] = []

    def on_ours(partial: dict) -> None:
        handed.append(json.loads(json.dumps(partial)))  # a copy, as the JSON file holds it

    report = run_nano(options, progress=lambda line: None, on_ours=on_ours)
    (partial,) = handed
    assert partial["complete"] is False
    assert partial["transformers"] is None and partial["transformers_contenders"] == []
    assert partial["ours"] == report["ours"] and partial["decode"] == report["decode"]
    assert partial["startup"] == report["startup"]
    assert report["complete"] is True
    assert [c["name"] for c in report["transformers_contenders"]] == ["hf-static"]
    assert report["transformers"] == report["transformers_contenders"][0]


def test_nano_bench_refuses_decode_steps_that_max_model_len_cannot_hold_before_it_runs(
    make_checkpoint, capsys: pytest.CaptureFixture
) -> None:
    """The tiny checkpoint's 512 positions leave a 12-token prompt 500 tokens: 499 timed
    steps would need 501. Refused as the engine starts, before the timed runs."""
    model = make_checkpoint("Qwen3ForCausalLM", dtype=torch.bfloat16, **TINY_QWEN3)
    assert json.loads((model / "config.json").read_text())["max_position_embeddings"] == 512
    argv = (
        f"--workload nano --device cpu --model-dir {model} --requests 2 --prompt-lens 8 16 "
        "--output-lens 4 8 --max-num-seqs 2 --max-num-batched-tokens 64 --kv-cache-mib 4 "
        "--decode-batches 2 --decode-steps 499 --hf-requests 0"
    )
    assert main(argv.split()) != 0
    captured = capsys.readouterr()
    assert (
        "timing 499 decode steps needs requests that make at least 501 tokens after their "
        "12-token prompt, but max_model_len (512) leaves 500; lower --decode-steps or "
        "--prompt-lens"
    ) in captured.err
    assert "run 1/" not in captured.out + captured.err  # no timed run started


@pytest.mark.timeout(120)
def test_decode_timing_stops_with_an_error_when_its_requests_end_inside_the_window(
    make_checkpoint,
) -> None:
    """max_model_len leaves the requests exactly enough tokens for the window's steps, but
    the prompts' prefill spreads over steps in which the first requests already decode:
    they end inside the window. Before, such a window was timed with part of its batch gone,
    and one whose requests had all ended waited forever for steps that never came."""
    from auto_glm.api import GLMModel
    from auto_glm.bench.decode import measure_decode

    model_dir = make_checkpoint("Qwen3ForCausalLM", dtype=torch.bfloat16, **TINY_QWEN3)
    prompt_len, steps = 12, 40
    model = GLMModel(
        str(model_dir), device="cpu", max_model_len=prompt_len + steps + 2, max_num_seqs=4,
        max_num_batched_tokens=16, kv_cache_memory=4 << 20,
    )  # fmt: skip
    try:
        engine = model.engine
        with pytest.raises(
            ValueError,
            match=r"a decode request ended \(length, 42 tokens at most\) after \d+ of the 40 "
            r"timed steps.*lower --decode-steps",
        ):
            measure_decode(engine, 4, prompt_len, steps, 100, 1, 1e9)
        # the same engine still times a window that fits, with many steps to spare
        step = measure_decode(engine, 4, prompt_len, 4, 100, 1, 1e9)
        assert step.batch == 4 and step.steps >= 4 and step.step_s > 0
    finally:
        model.close()


@pytest.mark.timeout(120)
def test_decode_timing_raises_when_a_step_fails_inside_the_window_and_once_the_engine_died(
    make_checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device fault from the window's tenth step on ends the measurement with the step's
    error; the next ones fail too, until the failures in a row stop the engine, and the one
    after, whose requests can no longer leave, raises EngineDeadError."""
    from auto_glm.api import GLMModel
    from auto_glm.bench.decode import measure_decode
    from auto_glm.engine.core import MAX_FAILED_STEPS, EngineDeadError

    model_dir = make_checkpoint("Qwen3ForCausalLM", dtype=torch.bfloat16, **TINY_QWEN3)
    model = GLMModel(
        str(model_dir), device="cpu", max_num_seqs=4, max_num_batched_tokens=64,
        kv_cache_memory=4 << 20,
    )  # fmt: skip
    try:
        engine = model.engine
        runner = engine.core.runner
        execute, calls = runner.execute, []

        def faulty(plan):
            calls.append(plan)
            if len(calls) >= 10:
                raise RuntimeError("simulated device fault")
            return execute(plan)

        monkeypatch.setattr(runner, "execute", faulty)
        with pytest.raises(Exception, match="simulated device fault"):
            measure_decode(engine, 4, 12, 100, 100, 1, 1e9)
        assert engine.is_alive  # one failed step ends its requests only
        for _ in range(MAX_FAILED_STEPS - 1):
            with pytest.raises(Exception, match="simulated device fault"):
                measure_decode(engine, 4, 12, 4, 100, 1, 1e9)
        assert not engine.is_alive
        with pytest.raises(EngineDeadError, match="simulated device fault"):
            measure_decode(engine, 4, 12, 4, 100, 1, 1e9)
    finally:
        model.close()


@pytest.mark.slow
def test_decode_kernel_sweep_checks_each_tiling_against_a_reference(tmp_path: Path) -> None:
    """The GPU's kernel sweep, run in triton's interpreter at tiny scale (its times mean
    nothing here): every tiling's output is compared with a float32 reference and reported,
    and timed in rounds over rotated K/V copies."""
    out, tuned = tmp_path / "sweep.json", tmp_path / "tiles.json"
    argv = "--quick --batches 1 3 --context 40 --iters 1 --rounds 2 --rotate-mib 1"
    argv = f"{argv} --write-tuned {tuned} --json".split()
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = REPO / "benchmarks" / "bench_decode_kernel.py"
    done = subprocess.run(
        [sys.executable, str(script), *argv, str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    for batch in (1, 3):  # the default, and one packed tiling, at the launcher's split-K
        tiled = {(r["block_n"], r["packed_heads"]) for r in rows if r["batch"] == batch}
        assert tiled == {(32, False), (16, False), (2, True)}
    assert len(rows) == 6 and all(r["matches"] and r["us"] > 0 for r in rows)
    # against the float32 reference; each timing rotates over copies of the K/V that fill
    # --rotate-mib (1 MiB: 7 copies of batch 1's 160 KB, 3 of batch 3's 480 KB), twice
    assert all(0 < r["rel_error"] <= 1e-2 and 0 < r["max_error"] <= 2e-2 for r in rows)
    assert {r["batch"]: r["kv_copies"] for r in rows} == {1: 7, 3: 3}
    for r in rows:
        assert len(r["rounds_us"]) == 2 and r["us"] == sum(r["rounds_us"]) / 2
    assert "fastest at batch 3: DecodeTiles(" in done.stdout
    # the fastest of each batch at the launcher's split-K, recorded for this "card" (the
    # interpreter's times mean nothing, but the file is what the engine would read)
    (key, entries), *_ = read_tuned_tiles(tuned).items()
    assert key == "cpu, q bfloat16, cache bfloat16, H 16, H_kv 8, D 128"
    assert [batch for batch, _ in entries] == [1, 3]
    for batch, tiles in entries:
        auto = [r for r in rows if r["batch"] == batch and r["num_splits"] == "auto"]
        fastest = min(auto, key=lambda r: r["us"])
        assert (tiles.block_n, tiles.packed_heads) == (fastest["block_n"], fastest["packed_heads"])


SHORT_GRID = """
import importlib.util
import sys

spec = importlib.util.spec_from_file_location("sweep", sys.argv[1])
sweep = sys.modules["sweep"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)
real = sweep.paged_decode_attention


# the packed tiling, as if its grid were one sequence short
def last_row_skipped(q, k, v, tables, lens, block, scale, out, **options):
    if options["tiles"] is not None and options["tiles"].packed_heads:
        q, tables, lens, out = q[:-1], tables[:-1], lens[:-1], out[:-1]
    real(q, k, v, tables, lens, block, scale, out, **options)


sweep.paged_decode_attention = last_row_skipped
sys.exit(sweep.main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_decode_kernel_sweep_fails_a_tiling_that_leaves_a_row_unwritten(tmp_path: Path) -> None:
    """Each tiling writes into an output poisoned with NaN: one whose grid misses the last
    sequence (the rest exact) fails its check, is never recorded as the fastest, and the
    sweep exits 1."""
    out, tuned = tmp_path / "sweep.json", tmp_path / "tiles.json"
    script = REPO / "benchmarks" / "bench_decode_kernel.py"
    argv = f"--quick --batches 3 --context 24 --iters 1 --rounds 1 --write-tuned {tuned}"
    done = subprocess.run(
        [sys.executable, "-c", SHORT_GRID, str(script), *argv.split(), "--json", str(out)],
        capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"},
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {r["packed_heads"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows[True]["unwritten"] == 16 * 128  # the last sequence's heads
    assert rows[True]["rel_error"] != rows[True]["rel_error"]  # NaN
    assert not rows[True]["matches"] and "2048 elements unwritten WRONG" in done.stdout
    assert rows[False]["matches"] and rows[False]["unwritten"] == 0
    ((_, [(batch, tiles)]),) = read_tuned_tiles(tuned).items()
    assert batch == 3 and not tiles.packed_heads


@pytest.mark.slow
def test_decode_kernel_sweep_stopped_by_a_time_limit_keeps_the_batches_it_finished(
    tmp_path: Path,
) -> None:
    """On a lent GPU the sweep runs under a time limit: each batch's rows and fastest tiling
    are written as soon as it is timed, so a sweep killed during the next batch leaves them."""
    out, tuned = tmp_path / "sweep.json", tmp_path / "tiles.json"
    argv = f"--quick --batches 2 64 --context 40 --iters 1 --write-tuned {tuned} --json".split()
    script = REPO / "benchmarks" / "bench_decode_kernel.py"
    sweep = subprocess.Popen(
        [sys.executable, str(script), *argv, str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not out.exists() and sweep.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sweep.poll() is None, "the sweep ended before it could be stopped mid-way"
    finally:
        sweep.kill()
        sweep.wait()
    rows = json.loads(out.read_text())["rows"]
    assert {r["batch"] for r in rows} == {2} and all(r["matches"] for r in rows)
    ((_, entries),) = read_tuned_tiles(tuned).items()
    assert [batch for batch, _ in entries] == [2]
