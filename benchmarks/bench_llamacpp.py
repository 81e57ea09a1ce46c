"""llama.cpp's llama-server (f16 and q8_0) against our engine (bf16, f16, the same values held
in float32, int8, w8a8) on the engine benchmark's model and a seeded workload, in the same run
(issue 14).

llama.cpp is built from the source that the llama-cpp-python package ships (PyPI is the
only source reachable here):

    pip download llama-cpp-python==0.3.36 --no-binary :all: --no-deps -d /tmp/llcpp
    tar xzf /tmp/llcpp/llama_cpp_python-0.3.36.tar.gz -C /tmp/llcpp
    LL=/tmp/llcpp/llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -S $LL -B $LL/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
    cmake --build $LL/build -j2 --target llama-server llama-quantize
    python benchmarks/bench_llamacpp.py --llama-cpp $LL [--requests 16] [--runs 2]

The bench model (GLM-4-shaped, random bf16 weights, ``auto_glm.bench``) is converted by
llama.cpp's own ``convert_hf_to_gguf.py`` to an f16 GGUF, which ``llama-quantize`` turns
into q8_0. Our tokenizer is not one that llama.cpp recognises by its hash, so the
conversion is told to use its ``default`` pre-tokenizer; the prompts are token ids, so no
text is ever split and the choice changes nothing here.

Every contender gets the same requests at once and decodes greedily with EOS ignored,
``--parallel`` sequences at a time (llama-server's slots, with continuous batching; our
``max_num_seqs``), with ``--threads`` threads; output tokens are checked to be exactly
the asked lengths. One warm-up each, then ``--runs`` timed runs, round-robin; the median
output tokens/s, and each contender's weight file or weight memory. A mode of ours that
this CPU refuses (``w8a8`` without VNNI or AMX) is left out, with the reason printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

# Runs from a source checkout too, where auto_glm is not installed; bench_quant is beside it.
_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent), str(_HERE)]

from bench_quant import weight_bytes  # noqa: E402
from local_server import free_port  # noqa: E402

from auto_glm.bench.machine import cpu_line  # noqa: E402
from auto_glm.bench.model import bench_model_path, prompt_vocab  # noqa: E402
from auto_glm.bench.ours import OurEngine  # noqa: E402
from auto_glm.bench.workload import Workload, make_workload  # noqa: E402
from auto_glm.engine.threads import on_own_thread  # noqa: E402

__all__ = ["main"]

_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni")
# label: (the weights' dtype, quantization); "ours float32 weights" holds the same bf16
# checkpoint's values in float32 (oneDNN's float32 matmul), as a CPU without native bf16
# computes it either way; "ours f16" rounds them to float16, as llama.cpp's f16 GGUF does
OURS = {
    "ours bf16": ("bfloat16", "none"),
    "ours f16": ("float16", "none"),
    "ours float32 weights": ("float32", "none"),
    "ours int8": ("bfloat16", "int8"),
    "ours w8a8": ("bfloat16", "w8a8"),
}
KV_CACHE_MEMORY = 256 << 20
# convert_hf_to_gguf.py with the default pre-tokenizer for a tokenizer it does not know
_CONVERT = """
import sys
sys.path[:0] = [{root!r}, {root!r} + "/gguf-py"]
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", {model!r}, "--outfile", {out!r}, "--outtype", "f16"]
convert_hf_to_gguf.main()
"""


def build_ggufs(root: Path, model_dir: Path, out: Path) -> dict[str, Path]:
    """The bench model as an f16 GGUF (llama.cpp's converter) and a q8_0 one (its quantizer)."""
    f16, q8 = out / "bench-f16.gguf", out / "bench-q8_0.gguf"
    code = _CONVERT.format(root=str(root), model=str(model_dir), out=str(f16))
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    quantize = root / "build" / "bin" / "llama-quantize"
    subprocess.run([str(quantize), str(f16), str(q8), "q8_0"], check=True, capture_output=True)
    return {"llama.cpp f16": f16, "llama.cpp q8_0": q8}


class LlamaServer:
    """One llama-server on a GGUF, serving the workload through ``/completion``."""

    def __init__(self, root: Path, gguf: Path, args: argparse.Namespace, context: int) -> None:
        self.gguf = gguf
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        command = [
            str(root / "build" / "bin" / "llama-server"),
            "--model", str(gguf),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--threads", str(args.threads),
            "--threads-batch", str(args.threads),
            "--parallel", str(args.parallel),
            "--ctx-size", str(context * args.parallel),
            "--batch-size", "512",
        ]  # fmt: skip
        self.log = gguf.with_suffix(".log")
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                error = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"llama-server on {gguf.name} did not start: {error}")
            time.sleep(0.5)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.base}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def run(self, workload: Workload) -> float:
        """Output tokens/s of the whole workload, sent at once."""

        async def one(client: httpx.AsyncClient, prompt: list[int], length: int) -> int:
            body = {
                "prompt": prompt,
                "n_predict": length,
                "ignore_eos": True,
                "temperature": 0,
                "cache_prompt": False,
            }
            response = await client.post("/completion", json=body)
            response.raise_for_status()
            predicted = response.json()["tokens_predicted"]
            if predicted != length:
                raise RuntimeError(f"llama-server gave {predicted} tokens, not {length}")
            return predicted

        async def everything() -> int:
            async with httpx.AsyncClient(base_url=self.base, timeout=3600) as client:
                done = await asyncio.gather(
                    *(one(client, r.prompt, r.output_len) for r in workload.requests)
                )
            return sum(done)

        start = time.perf_counter()
        tokens = asyncio.run(everything())
        return tokens / (time.perf_counter() - start)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


class Ours:
    def __init__(
        self, model_dir: Path, dtype: str, quantization: str, args: argparse.Namespace
    ) -> None:
        self.engine = OurEngine(
            model_dir, args.parallel, 512, KV_CACHE_MEMORY, quantization=quantization, dtype=dtype
        )

    def run(self, workload: Workload) -> float:
        # one engine thread (and OpenMP team) at a time: see auto_glm.bench.ours
        tokens_per_s = on_own_thread(self.engine.run, workload).tokens_per_s
        self.engine.release()
        return tokens_per_s

    def close(self) -> None:
        self.engine.close()


def _weights_mib(contender) -> float:
    """Every weight tensor our engine keeps, or the size of llama.cpp's GGUF file."""
    if isinstance(contender, Ours):
        return weight_bytes(contender.engine.model.engine.loaded.model)[1] / 2**20
    return contender.gguf.stat().st_size / 2**20


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp, built")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=16, help="sequences at a time")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(cpu_line(_FLAGS), f"threads={args.threads}", flush=True)
    model_dir = bench_model_path()
    vocab = prompt_vocab(model_dir)
    workload = make_workload(args.requests, args.seed, vocab, (64, 512), (64, 256))
    warmup = make_workload(2, 12345, vocab, (16, 32), (4, 8))
    context = 512 + 256 + 16
    contenders: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, gguf in build_ggufs(args.llama_cpp, model_dir, Path(tmp)).items():
            contenders[label] = LlamaServer(args.llama_cpp, gguf, args, context)
        for label, (dtype, quantization) in OURS.items():
            try:
                contenders[label] = on_own_thread(Ours, model_dir, dtype, quantization, args)
            except ValueError as exc:  # w8a8 on a CPU without VNNI or AMX: the reason
                print(f"{label}: left out: {exc}", flush=True)
        # weights first: a contender's engine is closed between its runs
        sizes = {label: _weights_mib(c) for label, c in contenders.items()}
        try:
            for contender in contenders.values():
                contender.run(warmup)
            timed: dict[str, list[float]] = {label: [] for label in contenders}
            for _ in range(args.runs):
                for label, contender in contenders.items():
                    timed[label].append(contender.run(workload))
                    print(f"{label}: {timed[label][-1]:.1f} tok/s", flush=True)
        finally:
            for contender in contenders.values():
                contender.close()
    base = statistics.median(timed["llama.cpp q8_0"])
    report = {
        label: {
            "tokens_per_s": statistics.median(runs),
            "vs_llama_cpp_q8_0": statistics.median(runs) / base,
            "runs": [round(r, 1) for r in runs],
            "weights_mib": round(sizes[label], 1),
        }
        for label, runs in timed.items()
    }
    print(
        f"workload: seed {args.seed}, {args.requests} requests, prompts 64-512, outputs "
        f"64-256 ({workload.output_tokens} output tokens), {args.parallel} at a time"
    )
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
