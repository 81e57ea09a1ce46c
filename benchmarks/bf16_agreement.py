"""How closely our engine's bfloat16 greedy output follows transformers' in bfloat16 (issue 13
asks for it to be reported on the GPU): the five architectures' tiny random checkpoints and
the nano benchmark's Qwen3-0.6B-shaped model.

Per model, ``--prompts`` random prompts are continued greedily for ``--tokens`` tokens by our
engine. transformers then reads each prompt plus our tokens in one forward pass; *top-1
agreement* is the share of our tokens that are also transformers' argmax at that position
(teacher-forced, so one early difference does not decide the rest). *Same sequence* counts
the prompts whose whole greedy continuation by transformers' own ``generate`` is ours.
Random weights give flat logits with many near-ties, which bfloat16 rounding flips: read the
numbers as a floor for real checkpoints.

    python benchmarks/bf16_agreement.py [--device cuda] [--prompts 8] [--tokens 32]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from auto_glm import GLMModel, SamplingParams  # noqa: E402
from auto_glm.bench.hf import greedy_continuations, load_hf_model  # noqa: E402
from auto_glm.bench.nano import nano_model_path  # noqa: E402
from auto_glm.checkpoints import build_random_checkpoint  # noqa: E402
from auto_glm.models import SUPPORTED_ARCHITECTURES  # noqa: E402

# the text models (the vision model's checkpoints need images to be compared)
ARCHITECTURES = [name for name in SUPPORTED_ARCHITECTURES if name.endswith("ForCausalLM")]


def _prompts(vocab: int, count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    top = min(vocab, 10_000) - 1
    return [[rng.randint(0, top) for _ in range(rng.randint(8, 64))] for _ in range(count)]


@torch.inference_mode()
def _compare(path: Path, device: str, prompts: int, tokens: int) -> tuple[float, int]:
    """(top-1 agreement, prompts whose greedy continuation is the same) for one model."""
    with GLMModel(str(path), device=device, dtype="bfloat16") as ours:
        vocab = ours.engine.loaded.model.spec.vocab_size
        batch = _prompts(vocab, prompts, seed=0)
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        generated = [r.token_ids for r in ours.generate_batch(batch, params)]
    hf = load_hf_model(path, torch.bfloat16, device)
    agree = 0
    for prompt, out in zip(batch, generated, strict=True):
        ids = torch.tensor([prompt + out], device=device)
        logits = hf(input_ids=ids).logits[0, len(prompt) - 1 : -1]  # [tokens, V]
        agree += int((logits.argmax(-1).cpu() == torch.tensor(out)).sum())
    greedy = greedy_continuations(hf, batch, tokens)
    same = sum(theirs == ours for theirs, ours in zip(greedy, generated, strict=True))
    del hf
    return agree / (prompts * tokens), same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--no-nano", action="store_true", help="skip the 0.6B nano model")
    args = parser.parse_args()
    print(f"bfloat16 greedy, ours against transformers on {args.device} ({torch.__version__})")
    print("| model | top-1 agreement | same sequence |")
    print("|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        models = [
            (arch, build_random_checkpoint(Path(tmp) / arch, arch, dtype=torch.bfloat16))
            for arch in ARCHITECTURES
        ]
        if not args.no_nano:
            models.append(("nano (Qwen3-0.6B-shaped)", nano_model_path()))
        for name, path in models:
            agreement, same = _compare(path, args.device, args.prompts, args.tokens)
            print(f"| {name} | {100 * agreement:.1f}% | {same}/{args.prompts} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
