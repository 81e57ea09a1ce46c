"""FlashInfer's attention kernels for the engine's shapes, built ahead of time (issue 13).

FlashInfer compiles each kernel with nvcc the first time it is planned, which takes minutes
that a short GPU session does not have. Compiling needs no GPU, so ``build`` compiles here
the kernels that the FlashInfer backend plans with (paged decode; paged prefill, FA2 and,
for Hopper, FA3) into the layout of FlashInfer's folder of prebuilt kernels
(``NAME/NAME.so``), and ``load``, on the GPU machine, copies them into that folder of the
installed package and loads each one, compiling there only what is missing or fails to load.

  # here, with CUDA 13.0's compiler unpacked from its wheels (benchmarks/gpu_wheels.sh)
  python benchmarks/flashinfer_prebuild.py build --cuda-home DIR --out .whl-flashinfer/aot
  # on the GPU machine (gpu_check.sh's flashinfer step)
  python benchmarks/flashinfer_prebuild.py load --prebuilt .whl-flashinfer/aot

The kernels are FlashInfer's, named as its wrappers name them, so a plan finds a prebuilt
one exactly where it would find one from FlashInfer's own prebuilt-kernel package.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from auto_glm.layers.attention_backends.flashinfer import kernel_specs

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# FlashInfer's kernel names do not hold its version: the folder records it
VERSION_FILE = "flashinfer-version.txt"


def _link_dir(cuda_home: Path) -> Path:
    """A folder that lets the linker find ``-lcudart`` and ``-lcuda`` in a toolkit unpacked
    from wheels, which hold only ``libcudart.so.13`` and no driver stub: a link to the
    former, and an empty stub whose name is the driver's (resolved on the GPU machine)."""
    cudart = sorted((cuda_home / "lib").glob("libcudart.so.*"))
    if not cudart:
        raise SystemExit(f"{cuda_home}/lib holds no libcudart.so.*: install nvidia-cuda-runtime")
    links = Path(tempfile.mkdtemp(prefix="autoglm-cuda-link-"))
    (links / "libcudart.so").symlink_to(cudart[0])
    empty = links / "empty.c"
    empty.write_text("")
    subprocess.run(
        ["cc", "-shared", "-Wl,-soname,libcuda.so.1", "-o", str(links / "libcuda.so"), str(empty)],
        check=True,
    )
    return links


def build(args: argparse.Namespace) -> int:
    cuda_home = Path(args.cuda_home or os.environ.get("CUDA_HOME", "")).resolve()
    if not (cuda_home / "bin" / "nvcc").is_file():
        raise SystemExit(
            f"no nvcc in {cuda_home}/bin: pass --cuda-home, a CUDA 13.0 toolkit "
            "(benchmarks/gpu_wheels.sh unpacks one from its wheels)"
        )
    links = _link_dir(cuda_home)
    workspace = tempfile.mkdtemp(prefix="autoglm-flashinfer-")  # sources and objects
    # read when flashinfer is imported, so set first
    os.environ.update(
        CUDA_HOME=str(cuda_home),
        FLASHINFER_CUDA_ARCH_LIST=args.arch,
        FLASHINFER_WORKSPACE_BASE=workspace,
        FLASHINFER_EXTRA_LDFLAGS=f"-L{links}",
        MAX_JOBS=str(args.jobs),
    )
    import flashinfer

    print(f"flashinfer {flashinfer.__version__}, nvcc in {cuda_home}, sm {args.arch}")
    args.out.mkdir(parents=True, exist_ok=True)
    hopper = args.arch.startswith("9.")
    for dtype in args.dtypes:
        for head_dim in args.head_dims:
            for spec in kernel_specs(DTYPES[dtype], head_dim, hopper):
                start = time.perf_counter()
                spec.build()
                target = args.out / spec.name / f"{spec.name}.so"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(spec.jit_library_path, target)
                size = target.stat().st_size / 1e6
                print(f"{spec.name}: {size:.1f} MB, {time.perf_counter() - start:.0f} s")
    # last: a folder with the stamp holds every kernel (gpu_wheels.sh keeps such a folder)
    (args.out / VERSION_FILE).write_text(flashinfer.__version__)
    shutil.rmtree(links)
    shutil.rmtree(workspace)
    return 0


def load(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise SystemExit("load needs a CUDA GPU (it loads the kernels there)")
    import flashinfer
    from flashinfer.jit import env

    major, minor = torch.cuda.get_device_capability()
    print(f"flashinfer {flashinfer.__version__}, prebuilt kernels in {env.FLASHINFER_AOT_DIR}")
    if args.prebuilt is not None:
        _install(args.prebuilt, env.FLASHINFER_AOT_DIR, flashinfer.__version__)
    torch.zeros(1, device="cuda")  # the CUDA runtime the kernels link to, loaded first
    failed = 0
    for dtype in args.dtypes:
        for head_dim in args.head_dims:
            for spec in kernel_specs(DTYPES[dtype], head_dim, hopper=major == 9):
                start = time.perf_counter()
                try:
                    how = _load(spec)
                except Exception as error:  # noqa: BLE001 - reported, then the next one
                    failed += 1
                    print(f"{spec.name}: FAILED: {error}")
                    continue
                print(
                    f"{spec.name}: {how}, {time.perf_counter() - start:.1f} s (sm {major}.{minor})"
                )
    return 1 if failed else 0


def _install(prebuilt: Path, aot_dir: Path, version: str) -> None:
    """Copy ``build``'s kernels into FlashInfer's folder of prebuilt ones, if they were built
    by this version of FlashInfer."""
    stamp = prebuilt / VERSION_FILE
    built_by = stamp.read_text().strip() if stamp.is_file() else None
    if built_by != version:
        print(f"{prebuilt}: built by flashinfer {built_by}, not {version}: every kernel compiles")
        return
    shutil.copytree(prebuilt, aot_dir, dirs_exist_ok=True)


def _load(spec) -> str:
    """Load one kernel module, prebuilt if it is there and loads, else compiled here; say
    which."""
    if spec.is_aot:
        try:
            spec.load(spec.aot_path)
            return "prebuilt"
        except Exception as error:  # noqa: BLE001 - compiled instead, as FlashInfer would
            print(f"{spec.name}: the prebuilt kernel does not load ({error}); compiling it")
    spec.build()
    spec.load()
    return "compiled here"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    parsers = {name: sub.add_parser(name) for name in ("build", "load")}
    for one in parsers.values():
        one.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bfloat16"])
        one.add_argument(
            "--head-dims", type=int, nargs="+", default=[128],
            help="the models' head_dim (default: 128, the nano model's and the GPU tests')",
        )  # fmt: skip
    build_args, load_args = parsers["build"], parsers["load"]
    build_args.add_argument(
        "--cuda-home", default=None, help="a CUDA toolkit (default: $CUDA_HOME)"
    )
    build_args.add_argument("--arch", default="9.0a", help="the GPU's (default: 9.0a, Hopper)")
    build_args.add_argument("--out", type=Path, required=True, help="the prebuilt kernels' folder")
    build_args.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    load_args.add_argument(
        "--prebuilt", type=Path, default=None, help="kernels from `build`, copied in first"
    )
    args = parser.parse_args(argv)
    return build(args) if args.command == "build" else load(args)


if __name__ == "__main__":
    sys.exit(main())
