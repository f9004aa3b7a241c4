#!/usr/bin/env bash
# Every check that needs a GPU, as one short script for a lent device (see DEVELOPERS.md / docs/benchmarks.md).
# Usage (on the device machine, repository root, after `make install` or with the venv carried):
#     OUT=/some/dir bash benchmarks/gpu_checks.sh
# Writes one log and one JSON per check under $OUT; copy the tables into docs/benchmarks.md with the card's name.
set -u
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
run() {  # name, timeout seconds, command...
  local name=$1 t=$2; shift 2
  echo "== $name" | tee -a "$OUT/summary.txt"
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1
  echo "exit $? ($name)" | tee -a "$OUT/summary.txt"
  tail -8 "$OUT/$name.log" >> "$OUT/summary.txt"
}
# 1. the Triton kernel compiled for the card: parity with the float64 oracle and the torch GEMM, and speed
run search 240 "$PY" benchmarks/bench_search.py --no-cpu --json "$OUT/search.json"
# 2. bf16 encoder: token agreement with fp32
run bf16 120 "$PY" benchmarks/bench_bf16_agreement.py --json "$OUT/bf16.json"
# 3. the pipeline on the GPU with the released architecture (goal: >= 1000 img/s per H100 at 256², bf16)
run tokenize 300 "$PY" benchmarks/bench_gpu_tokenize.py --images 4096 --json "$OUT/tokenize.json"
