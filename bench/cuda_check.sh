#!/usr/bin/env bash
# The GPU checks in one run, for a machine with CUDA (e.g. the project's lent H200): every CUDA
# test, the seed example on CUDA (float64 and float32), then the benchmark on the GPU. Writes
# bench/results/cuda*.{txt,json} (or under $OUT/).
# Usage from the repository root: bash bench/cuda_check.sh
set -uo pipefail
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)" PYTHONUNBUFFERED=1
out="${OUT:-bench/results}"
mkdir -p "$out"
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$out/cuda-device.txt"
python -m pytest -q -k cuda tests 2>&1 | tee "$out/cuda-tests.txt"
for dtype in float64 float32; do
  python examples/seed_notebook.py --device cuda --dtype "$dtype" 2>&1 | tee "$out/cuda-seed-$dtype.txt"
done
python bench/run.py --device cuda --json "$out/cuda.json" 2>&1 | tee "$out/cuda.txt"
