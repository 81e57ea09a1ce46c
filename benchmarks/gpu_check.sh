#!/usr/bin/env bash
# One prepared GPU session (issue 13), about 7.5 minutes on an H200 (its steps' limits add up
# to 11.3, past one device call's 10, so a run of slow steps loses the last ones): the GPU and
# the versions seen, the decode kernel over a grid of tilings (the fastest recorded for the
# engine), `autoglm bench --device cuda --workload nano`, where a step's time goes
# (profiler), bf16 agreement with transformers, the CUDA-only tests and the Triton kernel
# tests on the GPU. Every step runs under its own timeout and a failing step never stops the
# next; the end prints each step's status and elapsed seconds.
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]      # default ./gpu-results
#   STEPS="gpu profile cuda-tests" bash benchmarks/gpu_check.sh "$OUT"   # some steps only
#
# Steps, in order: wheels gpu decode-kernel nano profile agreement cuda-tests triton-tests
# (the default), then flashinfer-tests flashinfer-nano (FlashInfer's backend, which first
# builds its kernels on the GPU: a second call, see below). RESULTS_DIR receives six files
# (the device tool brings back at most eight): check.log (every step's output, in order),
# decode_kernel.json (the tilings' times), decode_tiles.json (the fastest, as recorded for
# the engine: commit it to auto_glm/kernels/triton/), nano.json (the benchmark's report,
# on the Triton backend), status.json (each step's status, exit code and seconds) and
# traces.tar (the profile's gzipped traces); the FlashInfer steps write nano_flashinfer.json.
#
# On the workplace's device machine (/work/.library/device/README.md): its image has python3
# (3.12) with torch, triton, transformers (5.17 when last read), pytest and pytest-timeout, but
# not our server dependencies, and nothing can be downloaded there. The benchmarks import
# none of the server's packages; transformers is carried at the version CI uses, so that its
# continuous batching (the transformers contender) is the same API, and pydantic for the
# tests that build server settings. Once, here, in the repository root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl transformers==5.24.0 \
#       pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
#
# then call the device tool's `run` with carry [".whl"], timeout_s 600 and the command
#
#   bash benchmarks/gpu_check.sh "$OUT"
#
# so the results come back (at most 8 files from $OUT). FlashInfer (the `gpu` extra) is not
# in the image either, and its kernels are built (JIT) by nvcc on first use there, which
# takes minutes: its wheels go in a folder of their own, so that the steps above run on the
# Triton backend as before. Once, here:
#
#   echo /.whl-flashinfer/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 -d .whl-flashinfer \
#       flashinfer-python==0.6.18 apache-tvm-ffi==0.1.15.post2
#
# and, right after the first call (the machine stays warm for 30 s), a second with carry
# [".whl", ".whl-flashinfer"], timeout_s 600 and the command
#
#   STEPS="wheels flashinfer-tests flashinfer-nano" bash benchmarks/gpu_check.sh "$OUT"
# The wheels in $WHEELS (default .whl)
# are installed into /tmp/site with pip --no-index and put on PYTHONPATH, ahead of the image's;
# the repository itself goes on PYTHONPATH too (nothing is pip-installed). Without a .whl
# folder the image's packages are used as they are. The time limits below (seconds) can be
# changed through the environment: WHEELS_LIMIT, GPU_LIMIT, DECODE_KERNEL_LIMIT, NANO_LIMIT,
# PROFILE_LIMIT, AGREEMENT_LIMIT, CUDA_TESTS_LIMIT, TRITON_LIMIT, FLASHINFER_TESTS_LIMIT,
# FLASHINFER_NANO_LIMIT; NANO_ARGS replaces the benchmark's extra options (default
# "--hf-requests 32": transformers' continuous batching ran at 182 output tokens/s on an
# H200, so its share of the run is what the limit must allow for).

set -u -o pipefail

: "${WHEELS_LIMIT:=30}" "${GPU_LIMIT:=20}" "${NANO_LIMIT:=220}" "${DECODE_KERNEL_LIMIT:=100}"
: "${PROFILE_LIMIT:=70}"
: "${AGREEMENT_LIMIT:=60}" "${CUDA_TESTS_LIMIT:=110}" "${TRITON_LIMIT:=70}"
: "${FLASHINFER_TESTS_LIMIT:=300}" "${FLASHINFER_NANO_LIMIT:=200}"
: "${NANO_ARGS=--hf-requests 32}"
: "${PYTHON:=python3}"
: "${STEPS:=wheels gpu decode-kernel nano profile agreement cuda-tests triton-tests}"
KILL_AFTER=5
TRITON_TESTS=tests/kernels/test_triton_attention.py

results_arg=${1:-./gpu-results}
mkdir -p "$results_arg" || { echo "gpu_check: cannot create $results_arg" >&2; exit 2; }
RESULTS=$(cd "$results_arg" && pwd)
: >"$RESULTS/check.log"
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
WHEELS=${WHEELS:-$REPO/.whl}
FLASHINFER_WHEELS=${FLASHINFER_WHEELS:-$REPO/.whl-flashinfer}

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHON WHEELS FLASHINFER_WHEELS
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

names=() statuses=() codes=() times=()
begin=$SECONDS

# wanted NAME: whether STEPS names the step
wanted() { [[ " $STEPS " == *" $1 "* ]]; }

# run_step NAME LIMIT COMMAND...: run COMMAND under `timeout LIMIT`, its output to NAME.log
run_step() {
    local name=$1 limit=$2 start=$SECONDS rc status
    shift 2
    if ! wanted "$name"; then
        record "$name" skipped 0 0
        return
    fi
    echo "== [$name] start (limit ${limit} s, $((SECONDS - begin)) s into the check)" |
        tee -a "$RESULTS/check.log"
    timeout --kill-after="$KILL_AFTER" "$limit" "$@" 2>&1 | tee -a "$RESULTS/check.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    record "$name" "$status" "$rc" $((SECONDS - start))
}

# record NAME STATUS RC SECONDS: one line of the final summary and of status.json
record() {
    names+=("$1") statuses+=("$2") codes+=("$3") times+=("$4")
    echo "== [$1] $2 (exit $3) after $4 s" | tee -a "$RESULTS/check.log"
}

install_wheels() {  # install_wheels DIR TARGET
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$2" "$1"/*.whl
}

describe_gpu() {  # nvidia-smi last: its exit code is the step's
    "$PYTHON" - <<'EOF'
import sys

import torch
import transformers
import triton

print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}),",
      f"triton {triton.__version__}, transformers {transformers.__version__}")
print("torch sees:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
EOF
    nvidia-smi
}
flashinfer_tests() {  # the import first: without FlashInfer the tests would only skip
    "$PYTHON" -c "import flashinfer; print('flashinfer', flashinfer.__version__)" &&
        "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/engine/test_flashinfer_gpu.py
}
export -f install_wheels describe_gpu flashinfer_tests  # run_step runs them through `timeout bash -c`

# 1. the carried wheels, if any
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    run_step wheels "$WHEELS_LIMIT" bash -c 'install_wheels "$WHEELS" /tmp/site'
    export PYTHONPATH="$REPO:/tmp/site${PYTHONPATH#"$REPO"}"
else
    echo "no wheels in $WHEELS: using the image's packages" | tee -a "$RESULTS/check.log"
    record wheels skipped 0 0
fi

# 2. the GPU and the versions in use
run_step gpu "$GPU_LIMIT" bash -c describe_gpu

# 3. the paged decode kernel alone at batches 1, 64 and 256 over a grid of tilings, each
# checked against the default tiling's output and timed against its K/V floor; the fastest
# are recorded for this card in the package's decode_tiles.json, which the engine of the
# steps below reads, and a copy comes back with the results
TUNED=$REPO/auto_glm/kernels/triton/decode_tiles.json
run_step decode-kernel "$DECODE_KERNEL_LIMIT" "$PYTHON" benchmarks/bench_decode_kernel.py \
    --json "$RESULTS/decode_kernel.json" --write-tuned "$TUNED"
if [[ -f $TUNED ]]; then
    cp "$TUNED" "$RESULTS/decode_tiles.json"
fi

# 4. nano-vllm's benchmark: the report goes to nano.json, progress lines to nano.log
# shellcheck disable=SC2086  # NANO_ARGS is a list of options
run_step nano "$NANO_LIMIT" "$PYTHON" benchmarks/bench_engine.py --workload nano \
    --device cuda --attention-backend triton --json "$RESULTS/nano.json" $NANO_ARGS

# 5. where a decode step's and a prefill's time goes, on the nano model
run_step profile "$PROFILE_LIMIT" "$PYTHON" benchmarks/gpu_profile.py --out "$RESULTS/traces"
if [[ -d $RESULTS/traces ]]; then
    tar -cf "$RESULTS/traces.tar" -C "$RESULTS" traces && rm -rf "$RESULTS/traces"
fi

# 6. bfloat16 greedy agreement with transformers (five architectures and the nano model)
run_step agreement "$AGREEMENT_LIMIT" "$PYTHON" benchmarks/bf16_agreement.py --device cuda

# 7. the tests that skip without a CUDA GPU (found by what they check), Triton's apart: among
# them tests/engine/test_cuda_graphs_gpu.py, the five architectures' greedy tokens with CUDA
# graphs against eager and transformers
mapfile -t cuda_tests < <(grep -rlE 'cuda\.is_available\(\)|mark\.cuda\b' tests \
    --include='test_*.py' | grep -vxF "$TRITON_TESTS" | sort)
if ((${#cuda_tests[@]})); then
    run_step cuda-tests "$CUDA_TESTS_LIMIT" "$PYTHON" -m pytest -q -p no:cacheprovider \
        "${cuda_tests[@]}"
else
    echo "no CUDA-only tests found" | tee -a "$RESULTS/check.log"
    record cuda-tests missing 0 0
fi

# 8. the Triton kernels, natively on the GPU (float, int8/fp8 caches with per-token and with
# static scales)
if [[ -f $TRITON_TESTS ]]; then
    run_step triton-tests "$TRITON_LIMIT" "$PYTHON" -m pytest -q -p no:cacheprovider \
        "$TRITON_TESTS" tests/kernels/test_kv_static_triton.py
else
    echo "$TRITON_TESTS is not in this tree yet" | tee -a "$RESULTS/check.log"
    record triton-tests missing 0 0
fi

# 9. FlashInfer's backend, from its own wheels: its CUDA tests (the first builds its kernels),
# then the nano benchmark on it (transformers timed on 4 requests only: nano.json has it)
if wanted flashinfer-tests || wanted flashinfer-nano; then
    if compgen -G "$FLASHINFER_WHEELS/*.whl" >/dev/null; then
        install_wheels "$FLASHINFER_WHEELS" /tmp/site-flashinfer 2>&1 | tee -a "$RESULTS/check.log"
        export PYTHONPATH="$PYTHONPATH:/tmp/site-flashinfer"
    else
        echo "no wheels in $FLASHINFER_WHEELS: FlashInfer only if the image has it" |
            tee -a "$RESULTS/check.log"
    fi
fi
run_step flashinfer-tests "$FLASHINFER_TESTS_LIMIT" bash -c flashinfer_tests
run_step flashinfer-nano "$FLASHINFER_NANO_LIMIT" "$PYTHON" benchmarks/bench_engine.py \
    --workload nano --device cuda --attention-backend flashinfer --hf-requests 4 \
    --json "$RESULTS/nano_flashinfer.json"

total=$((SECONDS - begin))
echo
echo "== gpu_check: $total s in all; results in $RESULTS"
failed=0
steps=()
for i in "${!names[@]}"; do
    printf '%-14s %-8s exit %-4s %4s s\n' "${names[i]}" "${statuses[i]}" "${codes[i]}" "${times[i]}"
    steps+=("$(printf '{"step": "%s", "status": "%s", "exit": %s, "seconds": %s}' \
        "${names[i]}" "${statuses[i]}" "${codes[i]}" "${times[i]}")")
    [[ ${statuses[i]} == failed || ${statuses[i]} == timeout ]] && failed=1
done
(IFS=,; echo "{\"seconds\": $total, \"steps\": [${steps[*]}]}") >"$RESULTS/status.json"
exit $failed
