#!/usr/bin/env bash
# The GPU checks in one run, for a machine with CUDA (e.g. the project's lent H200): the CUDA
# parity tests, then the benchmark on the GPU. Writes bench/results/cuda.{txt,json} (or $OUT/).
# Usage from the repository root: bash bench/cuda_check.sh
set -uo pipefail
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)" PYTHONUNBUFFERED=1
out="${OUT:-bench/results}"
mkdir -p "$out"
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
python -m pytest -q -k cuda tests/test_parity.py tests/test_compile.py 2>&1 | tee "$out/cuda-tests.txt"
python bench/run.py --device cuda --json "$out/cuda.json" 2>&1 | tee "$out/cuda.txt"
