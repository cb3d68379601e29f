#!/usr/bin/env bash
# The GPU checks in one run, for a machine with CUDA (an H200 runs it in ~4 minutes):
# every CUDA test, the seed example on CUDA (float64 and float32), then the benchmark on the GPU
# (per-step, chunked fnmlp and JAX contenders): the seed and wide workloads, and the ensemble
# workload at K = 32 and 128 in float32; compile times in fresh processes skipped (slow there).
# Each stage has its own time limit, so that one that hangs leaves the others their time.
# Writes cuda-{tests,examples,bench}.txt and cuda-{seed,wide,ensemble}.json under $OUT if set,
# else bench/results/.
# Usage from the repository root: bash bench/cuda_check.sh
set -uo pipefail
# JAX beside torch on one GPU: JAX must not take 75% of its memory up front
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)" PYTHONUNBUFFERED=1 \
  XLA_PYTHON_CLIENT_PREALLOCATE=false
out="${OUT:-bench/results}"
mkdir -p "$out"
status=0

stage() {  # stage SECONDS LOG COMMAND...: run COMMAND under a time limit, appending to LOG
  local limit=$1 log=$2
  shift 2
  echo "== $* (limit ${limit}s)" | tee -a "$log"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "== exit $rc after $((SECONDS - start))s" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
}

: >"$out/cuda-tests.txt"; : >"$out/cuda-examples.txt"; : >"$out/cuda-bench.txt"
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" \
  2>&1 | tee -a "$out/cuda-bench.txt"
stage 140 "$out/cuda-tests.txt" python -m pytest -q -k cuda tests -p no:cacheprovider
for dtype in float64 float32; do
  stage 40 "$out/cuda-examples.txt" python examples/seed_notebook.py --device cuda --dtype "$dtype"
done
for workload in seed wide; do
  stage 90 "$out/cuda-bench.txt" python bench/run.py --device cuda --workload "$workload" \
    --no-compile-time --json "$out/cuda-$workload.json"
done
stage 120 "$out/cuda-bench.txt" python bench/run.py --device cuda --workload ensemble \
  --sizes 32,128 --dtype float32 --json "$out/cuda-ensemble.json"
exit $status
