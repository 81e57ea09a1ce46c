#!/usr/bin/env bash
# What benchmarks/gpu_check.sh carries to the GPU machine (issue 13), built here, where PyPI
# is reachable and no GPU is needed: about 5 minutes on 2 cores.
#
#   bash benchmarks/gpu_wheels.sh
#
# It fills two folders of the repository root, both kept out of git (.git/info/exclude):
#   .whl             wheels for Python 3.12 that the device image lacks or holds at another
#                    version, as benchmarks/gpu_wheels.txt lists them (transformers at the
#                    version CI uses, pydantic, llguidance);
#   .whl-flashinfer  FlashInfer (the `gpu` extra) and, in aot/, its attention kernels for the
#                    nano model's shape, compiled with CUDA 13.0's nvcc unpacked from its
#                    wheels (benchmarks/flashinfer_prebuild.py build), since compiling them
#                    there would take minutes of the session.
# Then call the device tool's `run` with carry [".whl", ".whl-flashinfer"], timeout_s 600 and
# the command `bash benchmarks/gpu_check.sh "$OUT"`. Wheels already in .whl are not
# downloaded again, and FlashInfer's kernels are built again only where aot/ lacks the stamp
# that the build writes last; delete a folder to build it anew. SCRATCH (default
# /tmp/autoglm-gpu-wheels) holds the unpacked compiler and FlashInfer for the build.

set -euo pipefail

: "${PYTHON:=python3}"
: "${SCRATCH:=/tmp/autoglm-gpu-wheels}"
cd "$(dirname "$0")/.."

# the image's Python (3.12) and the GPU machine's platform (its glibc takes any of these
# manylinux tags; pip matches each tag exactly), whatever this machine runs
download() {  # download DIR REQUIREMENT...
    local dir=$1 tag platforms=()
    shift
    for tag in 2014 _2_24 _2_28 _2_31; do
        platforms+=(--platform "manylinux${tag}_x86_64")
    done
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d "$dir" "$@"
}

exclude() {  # exclude FOLDER: keep the folder out of git
    local file
    file=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$file")"
    grep -qxF "/$1/" "$file" 2>/dev/null || echo "/$1/" >>"$file"
}

exclude .whl
exclude .whl-flashinfer

echo ".whl: downloading what it lacks"
download .whl -r benchmarks/gpu_wheels.txt

if [[ -f .whl-flashinfer/aot/flashinfer-version.txt ]]; then
    echo ".whl-flashinfer: kept (kernels built by flashinfer $(cat .whl-flashinfer/aot/flashinfer-version.txt))"
    exit 0
fi
echo ".whl-flashinfer: downloading FlashInfer, unpacking CUDA 13.0's compiler into $SCRATCH"
download .whl-flashinfer flashinfer-python==0.6.18 \
    apache-tvm-ffi==0.1.15.post2
"$PYTHON" -m pip install -q --no-deps --target "$SCRATCH/cuda-13.0" nvidia-cuda-nvcc==13.0.88 \
    nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 \
    nvidia-cuda-cccl==13.0.85 nvidia-curand==10.4.0.35
"$PYTHON" -m pip install -q --no-deps --target "$SCRATCH/flashinfer" flashinfer-python==0.6.18 \
    apache-tvm-ffi==0.1.15.post2 einops ninja nvidia-ml-py
echo ".whl-flashinfer: compiling FlashInfer's kernels (about 4 minutes)"
PATH="$SCRATCH/flashinfer/bin:$PATH" PYTHONPATH="$SCRATCH/flashinfer" \
    "$PYTHON" benchmarks/flashinfer_prebuild.py build \
    --cuda-home "$SCRATCH/cuda-13.0/nvidia/cu13" --out .whl-flashinfer/aot
du -sh .whl .whl-flashinfer
