#!/usr/bin/env bash
# The GPU checks of one lent CUDA machine, in one script (each step time-boxed so that a slow
# one still leaves the others' results): the CUDA tests, a whole compile of a model with
# Qwen3-30B-A3B's layer shapes (benchmarks/cuda_compile.py), and the expert-kernel benchmark
# after autotuning on this GPU (benchmarks/expert_kernels.py --tune). Results go to $OUT (default ./gpu-out).
#
#   FLEXC_CACHE=<dir with zoo/tiny> bash benchmarks/gpu_checks.sh
set -uo pipefail
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
echo "== CUDA tests"
timeout "${T_TESTS:-90}" python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_kernels.py tests/test_lower_kernels.py 2>&1 | tail -15 | tee "$OUT/pytest_cuda.log"
# per-pair widths (tokens at several budgets in one call): tested in the interpreter only so far
timeout "${T_PAIR:-60}" python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k pair 2>&1 | tail -5 | tee "$OUT/pytest_pair_widths.log"
echo "== compile at Qwen3-30B-A3B's layer shapes"
timeout "${T_COMPILE:-150}" python3 benchmarks/cuda_compile.py --layers "${LAYERS:-3}" --out "$OUT/cuda_compile.json" 2>&1 \
  | grep -v "it/s\]" | tee "$OUT/cuda_compile.log"
rm -rf /tmp/flexc-cuda-compile
echo "== expert kernels, tuned on this GPU"
timeout "${T_KERNELS:-330}" python3 benchmarks/expert_kernels.py --tune --tune-out "$OUT/kernel_configs.json" --out "$OUT/kernels.json" 2>&1 \
  | tee "$OUT/kernels.log" | grep -v "^tune\|^  tun"
ls -la "$OUT"
