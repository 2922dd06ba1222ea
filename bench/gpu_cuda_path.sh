#!/usr/bin/env bash
# The CUDA-path checks of issue 13, ready for the day a GPU is lent (about 5 minutes on one H100/H200):
#   1. every gpu-marked test (NF4 codes vs bitsandbytes on CUDA, the fused LoRA node in bf16, the dropout mask
#      redrawn in backward, CPU vs CUDA codes, native bf16, F64/F8 weights, paged states after a resume,
#      fp32 master weights with paged AdamW, RNG restore, kill -9 + resume in bf16, planner vs measured)
#   2. bench/gpu_memory_check.py: planned vs measured memory per phase, the cuBLAS workspaces, the CUDA
#      context, allocator slack and paged states (the planner's assumptions), saved to bench/results/.
# Usage: bash bench/gpu_cuda_path.sh   (logs also go to $OUT when set, as on the device machine)
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${OUT:-bench/results}
mkdir -p "$logs"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.cuda.get_device_name())" || exit 0
PYTHONUNBUFFERED=1 python -m pytest -q -m gpu -rs tests 2>&1 | tee "$logs/gpu_tests.log"
tests=${PIPESTATUS[0]}
PYTHONUNBUFFERED=1 python bench/gpu_memory_check.py 2>&1 | tee "$logs/gpu_memory_check.log"
bench=${PIPESTATUS[0]}
[ -d "$logs" ] && [ "$logs" != bench/results ] && cp bench/results/gpu_memory_check.* "$logs"/ 2>/dev/null
exit $(( tests || bench ))
