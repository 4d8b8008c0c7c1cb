#!/usr/bin/env bash
# The one command for a lent GPU machine: scripts/bench_gpu.py (SD-1.5 U-Net, ours with 'xla' and 'cudnn'
# attention against diffusers PyTorch; training step and 50-step guided DDIM) within a time budget.
#
#   BENCH_COMMIT=<commit of the copied tree> scripts/device_bench.sh [more bench_gpu.py flags]
#
# Runs from source (PYTHONPATH=.) on the machine's own jax, flax, optax and torch. Packages the machine lacks
# (diffusers and its dependencies: scripts/prepare_device_carry.sh makes the folder) are carried in one of
# $BENCH_WHEELS, third_party/bench_wheels, shared/wheels, third_party: the folder and each wheel in it go on
# PYTHONPATH. Without diffusers the PyTorch side is skipped with one line. The record goes to
# docs/results/bench_gpu.json and, with the log, into $OUT (what comes back). The settings share BENCH_BUDGET_S
# seconds (default 430; a setting that does not fit is recorded as not measured); the command stops within 8 min.
set -uo pipefail
cd "$(dirname "$0")/.."

extra=""
for dir in "${BENCH_WHEELS:-}" third_party/bench_wheels shared/wheels third_party; do
  if [ -n "$dir" ] && [ -d "$dir" ]; then
    dir="$(cd "$dir" && pwd)"
    extra="${extra}:${dir}"
    for wheel in "$dir"/*.whl; do  # Pure-Python wheels import from the zip itself.
      if [ -f "$wheel" ]; then extra="${extra}:${wheel}"; fi
    done
  fi
done
export PYTHONPATH=".${extra}${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
OUT="${OUT:-/tmp/bench_gpu_out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
BUDGET="${BENCH_BUDGET_S:-430}"

{
  echo "PYTHONPATH=$PYTHONPATH"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
} | tee "$OUT/bench_gpu.log"

marker="$OUT/.started"
touch "$marker"
timeout --kill-after=10 "$((BUDGET + 50))" \
  "$PYTHON" scripts/bench_gpu.py --budget_s "$BUDGET" "$@" 2>&1 | tee -a "$OUT/bench_gpu.log"
status=${PIPESTATUS[0]}
for record in docs/results/bench_gpu.json docs/results/bench_gpu_tiny.json; do
  if [ "$record" -nt "$marker" ]; then cp "$record" "$OUT/"; fi  # Only a record this run wrote.
done
rm -f "$marker"
echo "bench_gpu.py exit status $status; record and log in $OUT" | tee -a "$OUT/bench_gpu.log"
exit "$status"
