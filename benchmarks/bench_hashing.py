"""What checking a model's files costs per GiB: our hashing against sha256sum and model_signing.

Writes ``--files`` safetensors-like files of random bytes (``--size-gib`` in all) into a
temporary directory, reads them once so that every contender hashes from the page cache,
then times (best of ``--repeat`` rounds, each running every contender once):

- ``verify_files``: the registry's check, one thread per core (``os.cpu_count()``);
- ``verify_files``, one thread;
- ``sha256sum`` (coreutils) over all the files in one process: the peer;
- ``sha256sum``, one process per file, all at once;
- ``model_signing`` verifying a key signature of the directory (it hashes the files itself);
- the registry's signature check alone, which hashes nothing (it compares digests).

    python benchmarks/bench_hashing.py --size-gib 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Runs from a source checkout too, where auto_glm is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model_signing import signing, verifying  # noqa: E402

from auto_glm.bench.machine import cpu_line
from auto_glm.registry import build_manifest, generate_key_pair, verify_files  # noqa: E402
from auto_glm.registry.signing import check_signature, sign_manifest  # noqa: E402

__all__ = ["main"]

_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "sha_ni")


def _cpu() -> str:
    return cpu_line(_FLAGS)


def _write_model(directory: Path, size: int, files: int) -> list[Path]:
    (directory / "config.json").write_text(
        json.dumps({"architectures": ["BenchForCausalLM"], "torch_dtype": "bfloat16"})
    )
    paths = []
    for index in range(files):
        path = directory / f"model-{index + 1:05d}-of-{files:05d}.safetensors"
        body = size // files
        header = json.dumps(
            {"w": {"dtype": "BF16", "shape": [body // 2], "data_offsets": [0, body]}}
        )
        with open(path, "wb") as file:
            file.write(struct.pack("<Q", len(header)) + header.encode())
            for _ in range(body // (64 << 20)):
                file.write(os.urandom(64 << 20))
            file.write(os.urandom(body % (64 << 20)))
        paths.append(path)
    return paths


def _best(repeat: int, rows: dict[str, Callable[[], object]]) -> dict[str, float]:
    """The best time of each row over ``repeat`` rounds; a round runs every row once, so
    that a burst of load elsewhere on the machine slows all of them alike."""
    best = dict.fromkeys(rows, float("inf"))
    for _ in range(repeat):
        for name, run in rows.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _sha256sum_parallel(paths: list[Path]) -> None:
    processes = [subprocess.Popen(["sha256sum", str(p)], stdout=subprocess.DEVNULL) for p in paths]
    for process in processes:
        if process.wait() != 0:
            raise RuntimeError("sha256sum failed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0, help="default: 1")
    parser.add_argument("--files", type=int, default=4, help="default: 4")
    parser.add_argument("--repeat", type=int, default=3, help="runs per contender; best counts")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: $TMPDIR)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-hashing-") as scratch:
        root = Path(scratch)
        model = root / "model"
        model.mkdir()
        paths = _write_model(model, int(args.size_gib * 2**30), args.files)
        manifest = build_manifest(model, str(model))  # also warms the page cache
        gib = manifest.total_bytes / 2**30
        private, public = generate_key_pair(root / "keys")
        bundle, signer = sign_manifest(manifest, "bench@1", private)
        signature_file = root / "model.sig"
        signing.Config().use_elliptic_key_signer(private_key=private).sign(model, signature_file)
        verifier = verifying.Config().use_elliptic_key_verifier(public_key=public)
        rows = {
            f"ours: verify_files, {os.cpu_count()} threads": lambda: verify_files(model, manifest),
            "ours: verify_files, 1 thread": lambda: verify_files(model, manifest, workers=1),
            "sha256sum, 1 process (peer)": lambda: subprocess.run(
                ["sha256sum", *map(str, paths)], check=True, stdout=subprocess.DEVNULL
            ),
            f"sha256sum, {len(paths)} processes at once": lambda: _sha256sum_parallel(paths),
            "model_signing verify (key signature)": lambda: verifier.verify(model, signature_file),
            "ours: signature check only": lambda: check_signature(
                "bench@1", bundle, signer, manifest, "required", [public]
            ),
        }
        load = os.getloadavg()[0]
        seconds = _best(args.repeat, rows)
    peer = seconds["sha256sum, 1 process (peer)"]
    print(f"CPU: {_cpu()}")
    coreutils = subprocess.run(["sha256sum", "--version"], capture_output=True, text=True)
    print(
        f"Python {platform.python_version()} ({ssl.OPENSSL_VERSION}); "
        f"{coreutils.stdout.splitlines()[0]}"
    )
    print(
        f"data: {args.files} files, {gib:.2f} GiB in all, from the page cache; best of "
        f"{args.repeat} interleaved rounds; load average before: {load:.2f}"
    )
    print()
    print("| contender | seconds | s/GiB | GiB/s | time vs sha256sum |")
    print("|---|---:|---:|---:|---:|")
    for name, value in seconds.items():
        print(
            f"| {name} | {value:.3f} | {value / gib:.3f} | {gib / value:.2f} | "
            f"{value / peer:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
