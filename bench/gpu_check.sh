#!/usr/bin/env bash
# The GPU check, in one go on a lent GPU (target: under 5 minutes on one H200):
#
#     bash bench/gpu_check.sh [--cpu-smoke] [OUT_DIR]
#
# Steps: environment (versions; no ray/mlflow/optuna/pydantic imported by the modules used here), the test suite's
# CUDA tests (found as the tests marked skipif(not torch.cuda.is_available())), training throughput of the paper
# preset at MIRFlickr size in fp32 and bf16 (bench_train.py), mAP@ALL on CUDA at MIRFlickr and NUS-WIDE size with
# the |diff| against the CPU (bench_map.py), and 1, 2, 4 trials packed on the GPU against one alone (bench_pack.py).
# Everything goes to OUT_DIR/gpu_check.log (default OUT_DIR: ${OUT:-bench/out}); each step is timed; every step runs
# even if an earlier one failed (one shot on a lent GPU), and the exit status is non-zero if any failed.
#
# --cpu-smoke: the same steps on the CPU at tiny sizes (the CUDA tests are collected and skipped), so that CI
# keeps this script and the benchmarks' options from rotting (tests/test_gpu_check.py). Not a benchmark.
#
# Interpreter: PYTHON (default python3) needs torch, numpy, scipy, h5py, pyyaml, pytest, numba; not ray, mlflow,
# optuna or pydantic. Runs from the repository root with PYTHONPATH set to it. STEP_TIMEOUT (seconds, default 300)
# bounds each step.
set -u -o pipefail

MODE=gpu
if [[ "${1:-}" == "--cpu-smoke" ]]; then
    MODE=cpu-smoke
    shift
fi
OUT_DIR="${1:-${OUT:-bench/out}}"
PYTHON="${PYTHON:-python3}"
STEP_TIMEOUT="${STEP_TIMEOUT:-300}"

mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)" || exit 2
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
export PYTHONPATH="$PWD"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"

log() { echo "$*" | tee -a "$LOG"; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

FAILED=()
SUMMARY=()
# step NAME COMMAND...: run COMMAND (output tee'd into the log) under STEP_TIMEOUT, time it, record its status
step() {
    local name=$1
    shift
    local cmd="${*//$'\n'/ }"
    [[ ${#cmd} -gt 200 ]] && cmd="${cmd:0:200}..."
    log ""
    log "=== step $name: $cmd"
    local t0 rc ms
    t0=$(now_ms)
    timeout --kill-after=10 "$STEP_TIMEOUT" "$@" 2>&1 | tee -a "$LOG"
    rc=$?
    ms=$(( $(now_ms) - t0 ))
    local took
    took=$(printf '%d.%d s' $((ms / 1000)) $((ms % 1000 / 100)))
    if [[ $rc -eq 0 ]]; then
        log "=== step $name: ok in $took"
        SUMMARY+=("$name: ok, $took")
    else
        log "=== step $name: FAILED (exit $rc$([[ $rc -eq 124 ]] && echo ", timed out after $STEP_TIMEOUT s")) in $took"
        SUMMARY+=("$name: FAILED (exit $rc), $took")
        FAILED+=("$name")
    fi
    return $rc
}

T_START=$(now_ms)
log "gpu_check ($MODE) $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(uname -n); log: $LOG"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi 2>&1 | tee -a "$LOG"
else
    log "nvidia-smi: not found"
fi

if [[ $MODE == gpu ]]; then
    DEV=cuda
    WANT_CUDA=1
    TRAIN=(--device cuda --batch-sizes 128 --epochs 5)
    MAP=(--device cuda --repeats 5)
    MAP_NUSWIDE=(--device cuda --size nuswide --no-oracle --repeats 3)
    PACK=(--device cuda --packs 1 2 4 --epochs 4)
else
    DEV=cpu
    WANT_CUDA=0
    TRAIN=(--device cpu --n-train 256 --batch-sizes 64 --epochs 1 --threads 1)
    MAP=(--device cpu --n-queries 200 --n-database 2000 --repeats 1 --threads 1)
    MAP_NUSWIDE=(--device cpu --size nuswide --n-queries 200 --n-database 2000 --no-oracle --repeats 1 --threads 1)
    PACK=(--device cpu --packs 1 2 --n-train 256 --epochs 1 --batch-size 64 --threads 1)
fi

# 1. environment: versions, the device, and none of the service's heavy dependencies imported by what runs here
step environment "$PYTHON" -c "
import sys
sys.path.insert(0, 'bench')
import numpy, torch
import agch.method.train, agch.data.dataset, agch.evaluation.metrics, agch.config, agch.data.splits, agch.method.losses, agch.method.model, agch.method.similarity
import tests.conftest, tests.map_oracle, tests.method.test_train, tests.evaluation.test_metrics
import bench_train, bench_map, bench_pack
print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda,
      '| numpy', numpy.__version__)
heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'ray', 'mlflow', 'optuna', 'pydantic'})
assert not heavy, f'modules used by the GPU check import {heavy}: the GPU machine does not have them'
if torch.cuda.is_available():
    print('CUDA devices:', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
assert torch.cuda.is_available() or not $WANT_CUDA, 'no CUDA device visible to torch'
print('ok: no ray/mlflow/optuna/pydantic imported')
"
ENV_RC=$?

if [[ $ENV_RC -eq 0 || $MODE == cpu-smoke ]]; then
    # 2. the test suite's CUDA tests (skipped, but collected, on the CPU)
    mapfile -t CUDA_TESTS < <(awk '
        FNR == 1 { armed = 0 }
        /skipif\(not torch\.cuda\.is_available\(\)/ { armed = 1; next }
        armed && /^def test_/ { name = $2; sub(/\(.*/, "", name); print FILENAME "::" name; armed = 0 }
    ' tests/*/test_*.py)
    if [[ ${#CUDA_TESTS[@]} -eq 0 ]]; then
        log "no CUDA tests found (tests marked skipif(not torch.cuda.is_available()))"
        FAILED+=(cuda-tests)
        SUMMARY+=("cuda-tests: FAILED (none found)")
    else
        step cuda-tests "$PYTHON" -m pytest -q -rs -p no:cacheprovider "${CUDA_TESTS[@]}"
    fi

    # 3. training throughput, paper preset, batch 128, fp32 then bf16 autocast (share of the matching baseline)
    step train-fp32 "$PYTHON" bench/bench_train.py "${TRAIN[@]}"
    step train-bf16 "$PYTHON" bench/bench_train.py "${TRAIN[@]}" --bf16

    # 4. mAP@ALL at MIRFlickr and NUS-WIDE size (on CUDA: |diff| against the CPU's result)
    step map-mirflickr "$PYTHON" bench/bench_map.py "${MAP[@]}"
    step map-nuswide "$PYTHON" bench/bench_map.py "${MAP_NUSWIDE[@]}"

    # 5. trials packed on one device (what resources.gpus: 1/K with concurrency K does) against one alone
    step pack "$PYTHON" bench/bench_pack.py "${PACK[@]}"
else
    log "environment step failed on $MODE: the other steps are not run"
fi

MS=$(( $(now_ms) - T_START ))
log ""
log "=== summary ($MODE, device $DEV): total $((MS / 1000)).$((MS % 1000 / 100)) s"
for line in "${SUMMARY[@]}"; do
    log "  $line"
done
if [[ ${#FAILED[@]} -gt 0 ]]; then
    log "FAILED: ${FAILED[*]}"
    exit 1
fi
log "all steps ok"
