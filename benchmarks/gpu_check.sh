#!/usr/bin/env bash
# One prepared GPU session (issue 13), about 8 minutes on an H200: the GPU and the versions
# seen, FlashInfer's kernels loaded (prebuilt here, see below; in the background while the
# next steps run), the decode kernel over a grid of tilings (the fastest recorded for the
# engine), `autoglm bench --device cuda --workload nano` on the Triton backend (with
# transformers' static batches) and on FlashInfer's, bf16 agreement with transformers, the
# CUDA-only tests
# (FlashInfer's among them), the Triton kernel tests on the GPU, and where a step's time
# goes (profiler). Every step runs under its own timeout and a failing step never stops the
# next; the end prints each step's status and elapsed seconds. The steps are in order of
# what the issue needs most, so a call cut short loses the least.
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]      # default ./gpu-results
#   STEPS="gpu profile cuda-tests" bash benchmarks/gpu_check.sh "$OUT"   # some steps only
#
# Steps, in order: wheels gpu flashinfer decode-kernel nano flashinfer-nano agreement
# cuda-tests triton-tests profile. RESULTS_DIR receives seven files (the device tool brings
# back at most eight): check.log (every step's output, in order; a background step's when
# it is joined), decode_kernel.json (the tilings' times), decode_tiles.json (the fastest,
# as recorded for the engine: commit it to auto_glm/kernels/triton/), nano.json and
# nano_flashinfer.json (the benchmark's reports on each backend), status.json (each step's
# status, exit code and seconds) and traces.tar (the profile's gzipped traces).
#
# On the workplace's device machine (/work/.library/device/README.md): its image has python3
# (3.12) with torch, triton, transformers (5.17 when last read), nvcc (CUDA 13.0), pytest and
# pytest-timeout (benchmarks/gpu_image_packages.txt lists it all), but not our server
# dependencies nor FlashInfer, and nothing can be downloaded there. The benchmarks and the
# tests run here import none of the server's packages; what they need beyond the image is
# carried (benchmarks/gpu_wheels.txt): transformers at the version CI uses, so that the
# transformers contenders (generate, continuous batching) and the references are the ones
# CI tests, pydantic for the tests that build server settings, and llguidance for the
# structured-output rows of the tests' workloads. tests/test_gpu_check.py runs the test steps
# and the benchmarks in CI with only those importable. FlashInfer (the `gpu` extra) goes in
# a folder of its own, so that every other step runs without it, as before; its attention
# kernels for the nano model's shape (bf16, head_dim 128: the GPU tests' too) are compiled
# here, where no GPU is needed, since
# compiling them there would take minutes the session cannot spare: the flashinfer step
# loads them, and compiles only what is missing or does not load. Once, here, in the
# repository root (about 5 minutes; it fills .whl and .whl-flashinfer, kept out of git):
#
#   bash benchmarks/gpu_wheels.sh
#
# then call the device tool's `run` with carry [".whl", ".whl-flashinfer"] (about 47 MB
# with the tree, of the 64 MiB a call may carry), timeout_s 600 and the command
#
#   bash benchmarks/gpu_check.sh "$OUT"
#
# so the results come back (at most 8 files from $OUT). If the call is cut short, a second
# call while the machine is warm (30 s) runs the steps that status.json or check.log do not
# show as done, by STEPS, e.g. STEPS="wheels triton-tests profile". The wheels in $WHEELS
# (default .whl) are installed into $SITE (default /tmp/site) with pip --no-index and put
# on PYTHONPATH, ahead of the image's; those in $FLASHINFER_WHEELS (default .whl-flashinfer)
# into $FLASHINFER_SITE (default /tmp/site-flashinfer), on the PYTHONPATH of the flashinfer
# steps and the CUDA-only tests only; the repository itself goes on PYTHONPATH too (nothing
# is pip-installed). A wheel that pip refuses there leaves the others installed, and the
# step failed. Without a .whl folder the image's packages are used as they are. The time
# limits below (seconds) can be changed through the environment: WHEELS_LIMIT, GPU_LIMIT,
# FLASHINFER_LIMIT, DECODE_KERNEL_LIMIT, NANO_LIMIT, FLASHINFER_NANO_LIMIT, AGREEMENT_LIMIT,
# CUDA_TESTS_LIMIT, TRITON_LIMIT, PROFILE_LIMIT; NANO_ARGS replaces the Triton benchmark's
# extra options (default "--hf-requests 32 --hf-contenders static --static-batch-size 32":
# transformers' generate on one batch of the first 32 requests, about 1,000 steps. Its
# continuous batching ran at 182 output tokens/s on the same 32 requests on an H200
# (2026-11-28), 100 s of a session; add "cb" to time it too. The FlashInfer run leaves
# transformers out).

set -u -o pipefail

: "${WHEELS_LIMIT:=40}" "${GPU_LIMIT:=20}" "${FLASHINFER_LIMIT:=300}"
: "${DECODE_KERNEL_LIMIT:=120}" "${NANO_LIMIT:=150}" "${FLASHINFER_NANO_LIMIT:=150}"
: "${AGREEMENT_LIMIT:=60}" "${CUDA_TESTS_LIMIT:=200}" "${TRITON_LIMIT:=100}"
: "${PROFILE_LIMIT:=70}"
: "${NANO_ARGS=--hf-requests 32 --hf-contenders static --static-batch-size 32}"
: "${PYTHON:=python3}"
: "${STEPS:=wheels gpu flashinfer decode-kernel nano flashinfer-nano agreement cuda-tests triton-tests profile}"
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
SITE=${SITE:-/tmp/site} FLASHINFER_SITE=${FLASHINFER_SITE:-/tmp/site-flashinfer}
BACKGROUND=$(mktemp -d)  # a background step's output and exit code, until it is joined

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHON WHEELS FLASHINFER_WHEELS SITE FLASHINFER_SITE
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

names=() statuses=() codes=() times=()
declare -A pids=()
begin=$SECONDS

# wanted NAME: whether STEPS names the step
wanted() { [[ " $STEPS " == *" $1 "* ]]; }

# status_of RC: a step's status from its exit code
status_of() {
    case $1 in
        0) echo ok ;;
        124 | 137) echo timeout ;;
        *) echo failed ;;
    esac
}

# run_step NAME LIMIT COMMAND...: run COMMAND under `timeout LIMIT`, its output to check.log
run_step() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    if ! wanted "$name"; then
        record "$name" skipped 0 0
        return
    fi
    echo "== [$name] start (limit ${limit} s, $((SECONDS - begin)) s into the check)" |
        tee -a "$RESULTS/check.log"
    timeout --kill-after="$KILL_AFTER" "$limit" "$@" 2>&1 | tee -a "$RESULTS/check.log"
    rc=${PIPESTATUS[0]}
    record "$name" "$(status_of "$rc")" "$rc" $((SECONDS - start))
}

# start_step NAME LIMIT COMMAND...: run_step's COMMAND in the background, at low CPU priority
# (nvcc's compiles must not slow the benchmarks' host threads); join_step NAME waits for it
start_step() {
    local name=$1 limit=$2
    shift 2
    if ! wanted "$name"; then
        record "$name" skipped 0 0
        return
    fi
    echo "== [$name] start in the background (limit ${limit} s, $((SECONDS - begin)) s into" \
        "the check)" | tee -a "$RESULTS/check.log"
    (
        start=$SECONDS
        nice -n 10 timeout --kill-after="$KILL_AFTER" "$limit" "$@" >"$BACKGROUND/$name" 2>&1
        echo "$? $((SECONDS - start))" >"$BACKGROUND/$name.rc"
    ) &
    pids[$name]=$!
}

# join_step NAME: wait for a step that start_step began; its output goes to check.log now
join_step() {
    local name=$1 rc seconds
    [[ -n ${pids[$name]:-} ]] || return 0  # not started: recorded as skipped
    wait "${pids[$name]}"
    unset "pids[$name]"
    echo "== [$name] output (it ran in the background)" | tee -a "$RESULTS/check.log"
    tee -a "$RESULTS/check.log" <"$BACKGROUND/$name"
    read -r rc seconds <"$BACKGROUND/$name.rc"
    record "$name" "$(status_of "$rc")" "$rc" "$seconds"
}

# record NAME STATUS RC SECONDS: one line of the final summary and of status.json, which is
# rewritten each time, so that a call cut short still brings back the steps that ended
record() {
    local i steps=()
    names+=("$1") statuses+=("$2") codes+=("$3") times+=("$4")
    echo "== [$1] $2 (exit $3) after $4 s" | tee -a "$RESULTS/check.log"
    for i in "${!names[@]}"; do
        steps+=("$(printf '{"step": "%s", "status": "%s", "exit": %s, "seconds": %s}' \
            "${names[i]}" "${statuses[i]}" "${codes[i]}" "${times[i]}")")
    done
    (IFS=,; echo "{\"seconds\": $((SECONDS - begin)), \"steps\": [${steps[*]}]}") \
        >"$RESULTS/status.json"
}

pip_install() {  # pip_install TARGET WHEEL...
    local target=$1
    shift
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$target" "$@"
}

# install_wheels DIR TARGET: all at once; if pip refuses (a wheel whose platform tag this
# machine does not take stops the whole install), one by one, so the others still go in
install_wheels() {
    local wheel rc=0
    pip_install "$2" "$1"/*.whl && return
    echo "install_wheels: installing the wheels of $1 one by one"
    for wheel in "$1"/*.whl; do
        pip_install "$2" "$wheel" || { echo "install_wheels: $wheel refused"; rc=1; }
    done
    return $rc
}

install_all() {  # the wheels, then FlashInfer's apart
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        install_wheels "$WHEELS" "$SITE" || return
    else
        echo "no wheels in $WHEELS: using the image's packages"
    fi
    if compgen -G "$FLASHINFER_WHEELS/*.whl" >/dev/null; then
        install_wheels "$FLASHINFER_WHEELS" "$FLASHINFER_SITE"
    else
        echo "no wheels in $FLASHINFER_WHEELS: FlashInfer only if the image has it"
    fi
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
# the steps run these through `timeout bash -c`
export -f pip_install install_wheels install_all describe_gpu

# 1. the carried wheels, if any; FlashInfer's go on the path of the steps that use it only,
# so that the others run on Triton as in every earlier session
run_step wheels "$WHEELS_LIMIT" bash -c install_all
if [[ -d $SITE ]]; then
    export PYTHONPATH="$REPO:$SITE${PYTHONPATH#"$REPO"}"
fi
WITH_FLASHINFER="PYTHONPATH=$PYTHONPATH:$FLASHINFER_SITE"

# 2. the GPU and the versions in use
run_step gpu "$GPU_LIMIT" bash -c describe_gpu

# 3. FlashInfer's kernels for the nano model's shape: the prebuilt ones (.whl-flashinfer/aot)
# copied into the package and loaded, any missing compiled; while the next steps run
start_step flashinfer "$FLASHINFER_LIMIT" env "$WITH_FLASHINFER" MAX_JOBS=8 "$PYTHON" \
    benchmarks/flashinfer_prebuild.py load --prebuilt "$FLASHINFER_WHEELS/aot"

# 4. the paged decode kernel alone at batches 1, 64 and 256 over a grid of tilings, each
# checked against a float32 reference and timed from CUDA graphs (median of 3 rounds, K/V
# copies rotated past the L2 cache) against its K/V floor; the fastest are recorded for this
# card in the package's decode_tiles.json, which the engine of the steps below reads, and a
# copy comes back with the results
TUNED=$REPO/auto_glm/kernels/triton/decode_tiles.json
run_step decode-kernel "$DECODE_KERNEL_LIMIT" "$PYTHON" benchmarks/bench_decode_kernel.py \
    --json "$RESULTS/decode_kernel.json" --write-tuned "$TUNED"
if [[ -f $TUNED ]]; then
    cp "$TUNED" "$RESULTS/decode_tiles.json"
fi

# 5. nano-vllm's benchmark on the Triton backend, with transformers' static batches: the
# report goes to nano.json
# shellcheck disable=SC2086  # NANO_ARGS is a list of options
run_step nano "$NANO_LIMIT" "$PYTHON" benchmarks/bench_engine.py --workload nano \
    --device cuda --attention-backend triton --json "$RESULTS/nano.json" $NANO_ARGS

# 6. the same on FlashInfer's backend once its kernels are loaded (transformers: nano.json)
join_step flashinfer
run_step flashinfer-nano "$FLASHINFER_NANO_LIMIT" env "$WITH_FLASHINFER" "$PYTHON" \
    benchmarks/bench_engine.py --workload nano --device cuda --attention-backend flashinfer \
    --hf-requests 0 --json "$RESULTS/nano_flashinfer.json"

# 7. bfloat16 greedy agreement with transformers (five architectures and the nano model)
run_step agreement "$AGREEMENT_LIMIT" "$PYTHON" benchmarks/bf16_agreement.py --device cuda

# 8. the tests that skip without a CUDA GPU (found by what they check; those marked slow
# too: -m ""), Triton's apart, with FlashInfer on the path: among them
# tests/engine/test_cuda_graphs_gpu.py (the five architectures' greedy tokens with CUDA
# graphs against eager and transformers), tests/engine/test_flashinfer_gpu.py and
# tests/engine/test_warm_up.py (what triton compiles after an engine's start, in fresh
# processes, with the warm-up and without it); the 15 slowest are listed, to size the
# step's limit
mapfile -t cuda_tests < <(grep -rlE 'cuda\.is_available\(\)|mark\.cuda\b' tests \
    --include='test_*.py' | grep -vxF "$TRITON_TESTS" | sort)
if ((${#cuda_tests[@]})); then
    run_step cuda-tests "$CUDA_TESTS_LIMIT" env "$WITH_FLASHINFER" "$PYTHON" -m pytest -q -rs \
        -p no:cacheprovider -m "" --durations=15 "${cuda_tests[@]}"
else
    echo "no CUDA-only tests found" | tee -a "$RESULTS/check.log"
    record cuda-tests missing 0 0
fi

# 9. the Triton kernels, natively on the GPU (float, int8/fp8 caches with per-token and with
# static scales)
if [[ -f $TRITON_TESTS ]]; then
    run_step triton-tests "$TRITON_LIMIT" "$PYTHON" -m pytest -q -p no:cacheprovider -m "" \
        "$TRITON_TESTS" tests/kernels/test_kv_static_triton.py
else
    echo "$TRITON_TESTS is not in this tree yet" | tee -a "$RESULTS/check.log"
    record triton-tests missing 0 0
fi

# 10. where a decode step's and a prefill's time goes, on the nano model (Triton backend)
run_step profile "$PROFILE_LIMIT" "$PYTHON" benchmarks/gpu_profile.py --out "$RESULTS/traces"
if [[ -d $RESULTS/traces ]]; then
    tar -cf "$RESULTS/traces.tar" -C "$RESULTS" traces && rm -rf "$RESULTS/traces"
fi

total=$((SECONDS - begin))
echo
echo "== gpu_check: $total s in all; results in $RESULTS"
failed=0
for i in "${!names[@]}"; do
    printf '%-16s %-8s exit %-4s %4s s\n' "${names[i]}" "${statuses[i]}" "${codes[i]}" \
        "${times[i]}"
    [[ ${statuses[i]} == failed || ${statuses[i]} == timeout ]] && failed=1
done
rm -rf "$BACKGROUND"
exit $failed
