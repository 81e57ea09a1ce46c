"""Image requests (issue 12): chat throughput and time to first token through the server,
and the vision encoder's time, each against transformers' GLM-4.1V in the same run.

Builds a tiny random-weight GLM-4.1V checkpoint (float32; ``--image-tokens`` bounds the
tokens an image becomes), then:

1. Encoder: ``--encoder-images`` screenshots, preprocessed once by the checkpoint's image
   processor, through our vision tower (``encode_images``) and transformers'
   (``get_image_features``), one image at a time after a warm-up; median milliseconds per
   image and the ratio.
2. Server: one :class:`GLMService` in a background thread; ``--requests`` streamed chat
   completions, ``--concurrency`` at a time, each a different 1080x2400 PNG screenshot as a
   base64 data URL plus a question, greedy with ``ignore_eos`` for exactly ``--max-tokens``
   tokens. Output tokens/s, requests/s and TTFT p50/p90, measured by the client from
   sending the request to its first content chunk: upload, PNG decoding, the image
   processor, the vision encoder and the prefill.
3. Peer: transformers from the same data URLs: PNG decoding, the checkpoint's image
   processor (with our placeholder expansion) and ``generate``, one request at a time,
   output tokens/s.

    python benchmarks/bench_vision.py [--requests 32] [--concurrency 8] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

# Runs from a source checkout too, where auto_glm is not installed.
_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent), str(_HERE)]

from local_server import free_port, serving  # noqa: E402
from sse import chunks  # noqa: E402

from auto_glm.api import GLMModel  # noqa: E402
from auto_glm.bench.machine import cpu_line  # noqa: E402
from auto_glm.checkpoints import build_random_vision_checkpoint  # noqa: E402
from auto_glm.serving import GLMService, ServerConfig  # noqa: E402

__all__ = ["main"]

_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
_QUESTION = "What is on this screen? Tap the button that opens the settings."


def screenshot(seed: int, width: int = 1080, height: int = 2400) -> Image.Image:
    """A phone-screen-like picture: cards of flat colour holding rows of glyph-sized marks,
    which compresses as a real screenshot does (about 1 MB of PNG at 1080x2400)."""
    rng = np.random.default_rng(seed)
    pixels = np.full((height, width, 3), 245, dtype=np.uint8)
    for top in range(0, height - 160, 160):
        pixels[top + 20 : top + 140, 40 : width - 40] = rng.integers(160, 255, 3)
        for row in range(top + 36, top + 124, 22):
            xs = np.flatnonzero(rng.random((width - 120) // 12) < 0.7) * 12 + 60
            glyph = rng.integers(0, 90, (len(xs), 14, 9, 3), dtype=np.uint8)
            for x, mark in zip(xs, glyph, strict=True):
                pixels[row : row + 14, x : x + 9] = mark
    return Image.fromarray(pixels, "RGB")


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _ms(values: list[float], percent: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1] * 1e3


def _prepared(model: GLMModel, image: Image.Image):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _QUESTION}]}
    ]
    text = model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    return model.engine.prepare(ids, [image])


def _hf_inputs(hf, prepared) -> dict:
    ids = torch.tensor([prepared.token_ids])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == hf.config.image_token_id).int(),
        "pixel_values": torch.cat([im.pixel_values for im in prepared.images]),
        "image_grid_thw": torch.tensor([im.grid_thw for im in prepared.images]),
    }


def _median_ms(work, items: list) -> float:
    work(items[0])  # warm-up
    times = []
    for item in items:
        start = time.perf_counter()
        work(item)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


@torch.inference_mode()
def bench_encoder(model: GLMModel, hf, images: list[Image.Image]) -> dict:
    prepared = [_prepared(model, image).images[0] for image in images]
    ours = model.engine.loaded.model
    ours_ms = _median_ms(lambda im: ours.encode_images([im.pixel_values], [im.grid_thw]), prepared)
    hf_ms = _median_ms(
        lambda im: hf.model.get_image_features(im.pixel_values, torch.tensor([im.grid_thw])),
        prepared,
    )
    return {
        "image_tokens": prepared[0].num_tokens,
        "ours_ms": ours_ms,
        "transformers_ms": hf_ms,
        "transformers/ours": hf_ms / ours_ms,
    }


@torch.inference_mode()
def bench_peer(model: GLMModel, hf, urls: list[str], max_tokens: int) -> float:
    """transformers from the same data URLs: decode, preprocess, generate, one at a time."""
    tokens, start = 0, time.perf_counter()
    for url in urls:
        png = base64.b64decode(url.partition(",")[2])
        image = Image.open(io.BytesIO(png)).convert("RGB")
        inputs = _hf_inputs(hf, _prepared(model, image))
        out = hf.generate(
            **inputs, do_sample=False, max_new_tokens=max_tokens, min_new_tokens=max_tokens
        )
        tokens += out.shape[1] - inputs["input_ids"].shape[1]
    return tokens / (time.perf_counter() - start)


async def _request(client: httpx.AsyncClient, url: str, max_tokens: int) -> tuple[float, int]:
    body = {
        "messages": [
            {"role": "system", "content": "You are a phone agent."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": _QUESTION},
                ],
            },
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }
    start, ttft, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for chunk in chunks(response):
            delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
            if ttft is None and delta.get("content"):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if tokens != max_tokens or ttft is None:
        raise RuntimeError(f"a request got {tokens} tokens, not {max_tokens}")
    return ttft, tokens


async def _load(base_url: str, urls: list[str], args: argparse.Namespace) -> dict:
    gate = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:

        async def gated(url: str) -> tuple[float, int]:
            async with gate:
                return await _request(client, url, args.max_tokens)

        await gated(urls[-1])  # warm-up: connections, code paths
        start = time.perf_counter()
        results = await asyncio.gather(*(gated(url) for url in urls[:-1]))
        wall = time.perf_counter() - start
    ttfts = [t for t, _ in results]
    return {
        "requests": len(results),
        "output_tokens_per_s": sum(n for _, n in results) / wall,
        "requests_per_s": len(results) / wall,
        "ttft_p50_ms": _ms(ttfts, 50),
        "ttft_p90_ms": _ms(ttfts, 90),
    }


def bench_server(model: GLMModel, urls: list[str], args: argparse.Namespace) -> dict:
    config = ServerConfig(
        host="127.0.0.1",
        port=free_port(),
        log_level="warning",
    )
    with serving(GLMService(model, config=config)) as base_url:
        return asyncio.run(_load(base_url, urls, args))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--image-tokens", type=int, default=256, help="most tokens per image")
    parser.add_argument("--encoder-images", type=int, default=8)
    parser.add_argument("--peer-requests", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(cpu_line(_FLAGS), f"threads={args.threads}", flush=True)
    from transformers import Glm4vForConditionalGeneration

    with tempfile.TemporaryDirectory() as tmp:
        # an image becomes at most max_pixels / (2 * patch**2 * merge**2) tokens
        path = build_random_vision_checkpoint(
            Path(tmp) / "glm4v", max_pixels=args.image_tokens * 2 * 4**2 * 2**2
        )
        model = GLMModel(
            str(path),
            device="cpu",
            dtype="float32",
            max_model_len=2048,
            max_num_seqs=args.concurrency,
        )
        hf = Glm4vForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        images = [screenshot(seed) for seed in range(args.encoder_images)]
        report = {"encoder": bench_encoder(model, hf, images)}
        print("encoder", json.dumps(report["encoder"]), flush=True)
        urls = [data_url(screenshot(1000 + i)) for i in range(args.requests + 1)]
        report["transformers_generate_tokens_per_s"] = bench_peer(
            model, hf, urls[: args.peer_requests], args.max_tokens
        )
        report["server"] = bench_server(model, urls, args)
        report["server/transformers"] = (
            report["server"]["output_tokens_per_s"] / report["transformers_generate_tokens_per_s"]
        )
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
