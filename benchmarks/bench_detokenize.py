"""What the output thread's text work costs per decode step: our detokenizer against the
Rust incremental decoder of the ``tokenizers`` library (``DecodeStream``), the peer.

Each step of a batch of ``--requests`` requests gives every request one token; the output
thread turns it into text (:class:`RequestOutputProcessor`: incremental detokenization and
stop strings). Both contenders decode the same token streams with the tokenizer of
``autoglm bench --workload nano`` (the same bytes, trained here in a temporary directory),
one token per request per step, and their text is checked against a full decode:

- ``nano``: what the nano benchmark's random-weight Qwen3 samples greedily. Its vocabulary
  (151,936) is padded far past the tokenizer's 11,038 tokens, and greedy decoding of random
  weights repeats a few ids: on this machine the first 150 tokens of 8 nano prompts held
  9, 5, 88, 10, 2, 3, 0 and 3 ids the tokenizer has, the rest were a few ids past it (the
  commonest 28-127 times). The streams are drawn alike: request ``i`` takes an id the
  tokenizer has with the ``i % 8``-th of those odds, else one of 3 ids past it;
- ``text``: the tokenizer's own corpus, encoded, each request starting at its own line.

    python benchmarks/bench_detokenize.py --requests 256 --tokens 600 --out detok.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Runs from a source checkout too, where auto_glm is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tokenizers.decoders import DecodeStream  # noqa: E402

from auto_glm.bench.machine import cpu_line  # noqa: E402
from auto_glm.bench.nano import NANO_CONFIG  # noqa: E402
from auto_glm.checkpoints.corpus import corpus_lines  # noqa: E402
from auto_glm.checkpoints.tokenizer import build_tokenizer  # noqa: E402
from auto_glm.engine.output_processor import RequestOutputProcessor  # noqa: E402
from auto_glm.sampling_params import SamplingParams  # noqa: E402

_PROMPT = 32  # prompt tokens per request at most (the detokenizers keep a few as context)
# ids the tokenizer has among the first 150 greedy tokens of 8 nano requests (measured)
_NANO_IN_VOCAB = (9, 5, 88, 10, 2, 3, 0, 3)


def nano_streams(tokens: int, count: int, known: int, seed: int) -> list:
    """``count`` streams of ``tokens`` ids: ids below ``known`` (the tokenizer's) at the
    rates of :data:`_NANO_IN_VOCAB`, else one of 3 ids past them per stream."""
    rng = random.Random(seed)
    vocab = NANO_CONFIG["vocab_size"]
    streams = []
    for i in range(count):
        odds = _NANO_IN_VOCAB[i % len(_NANO_IN_VOCAB)] / 150
        past = [rng.randrange(known, vocab) for _ in range(3)]
        streams.append(
            [rng.randrange(known) if rng.random() < odds else rng.choice(past)
             for _ in range(tokens)]
        )  # fmt: skip
    return streams


def text_streams(tokenizer, tokens: int, count: int) -> list:
    """``count`` streams of ``tokens`` ids of the corpus (over and over, for a stream longer
    than it), each from its own place on."""
    corpus = tokenizer.encode("\n".join(corpus_lines()), add_special_tokens=False)
    ids = corpus * (1 + (tokens + count) // len(corpus))
    step = max(1, (len(ids) - tokens) // count)
    return [ids[i * step : i * step + tokens] for i in range(count)]


def run_ours(tokenizer, prompts: list, streams: list) -> tuple[float, list[str]]:
    """Seconds to feed every stream, a token per request per step; the texts."""
    params = SamplingParams(max_tokens=len(streams[0]))
    processors = [RequestOutputProcessor(tokenizer, params, p) for p in prompts]
    start = time.perf_counter()
    for step in range(len(streams[0])):
        for processor, stream in zip(processors, streams, strict=True):
            processor.process([stream[step]])
    for processor in processors:
        processor.process([], finished=True)
    return time.perf_counter() - start, [p.text for p in processors]


def run_decode_stream(tokenizer, prompts: list, streams: list) -> tuple[float, list[str]]:
    """The same with ``tokenizers``' ``DecodeStream``, given the prompt as its context."""
    backend = tokenizer.backend_tokenizer
    decoders = [DecodeStream(ids=p[-6:], skip_special_tokens=True) for p in prompts]
    texts: list[list[str]] = [[] for _ in prompts]
    start = time.perf_counter()
    for step in range(len(streams[0])):
        for decoder, stream, text in zip(decoders, streams, texts, strict=True):
            chunk = decoder.step(backend, stream[step])
            if chunk:
                text.append(chunk)
    return time.perf_counter() - start, ["".join(t) for t in texts]


def measure(name: str, run: Callable, tokenizer, prompts, streams, repeat: int) -> dict:
    """Best of ``repeat`` runs; how many texts differ from a full decode of their stream."""
    best, texts = min((run(tokenizer, prompts, streams) for _ in range(repeat)),
                      key=lambda r: r[0])  # fmt: skip
    want = [tokenizer.decode(s, skip_special_tokens=True) for s in streams]
    tokens = len(streams) * len(streams[0])
    return {
        "contender": name,
        "seconds": best,
        "us_per_token": best / tokens * 1e6,
        "ms_per_step": best / len(streams[0]) * 1e3,
        "texts_unlike_full_decode": sum(t != w for t, w in zip(texts, want, strict=True)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=256, help="requests per step")
    parser.add_argument("--tokens", type=int, default=600, help="output tokens per request")
    parser.add_argument("--repeat", type=int, default=3, help="runs per contender; best kept")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    print(f"machine: {cpu_line()}")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(tmp, vocab_size=NANO_CONFIG["vocab_size"])
    known = len(tokenizer)
    # prompts end on a whole character, as a chat template's do
    lines = [line for line in corpus_lines() if line.strip()]
    prompts = [
        tokenizer.encode(lines[i % len(lines)] + "\n", add_special_tokens=False)[-_PROMPT:]
        for i in range(args.requests)
    ]
    workloads = {
        "nano": nano_streams(args.tokens, args.requests, known, seed=0),
        "text": text_streams(tokenizer, args.tokens, args.requests),
    }
    contenders = {"ours": run_ours, "tokenizers DecodeStream": run_decode_stream}
    results = []
    print(f"{args.requests} requests x {args.tokens} tokens; tokenizer of {known} tokens")
    print("| streams | contender | us/token | ms per step | ours / peer | texts unlike decode |")
    print("|---|---|---:|---:|---:|---:|")
    for workload, streams in workloads.items():
        rows = [
            measure(name, run, tokenizer, prompts, streams, args.repeat)
            for name, run in contenders.items()
        ]
        ratio = rows[0]["seconds"] / rows[1]["seconds"]
        for row in rows:
            row |= {"streams": workload, "ours_over_peer": ratio}
            print(
                f"| {workload} | {row['contender']} | {row['us_per_token']:.2f} "
                f"| {row['ms_per_step']:.2f} | {ratio:.2f}x | {row['texts_unlike_full_decode']} |"
            )
        results += rows
    if args.out:
        report = {"machine": cpu_line(), "args": vars(args) | {"out": str(args.out)}}
        args.out.write_text(json.dumps(report | {"results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
