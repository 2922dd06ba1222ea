#!/usr/bin/env bash
# The whole GPU check, ready for the day a GPU is lent (< 9 minutes on one H100/H200):
#   1. bench/gpu_cuda_path.sh: every gpu-marked test + bench/gpu_memory_check.py (planned vs measured)
#   2. bench/train_step.py's GPU section (bf16, paged AdamW, ours vs transformers+bitsandbytes+peft)
#   3. `qlora-kit profile` vs `plan` on a 1B and an 8B shape (synthetic weights, SmolLM2's tokenizer): the
#      planner's GPU error, profile.md per shape
#   4. bench/offload_gpu.py: a 65B-shaped model streamed under a 24 GiB cap, and the 8-layer overhead ratio
# Usage: bash bench/gpu_suite.sh   (logs also go to $OUT when set, as on the device machine; results into
# bench/results/). Without CUDA it says so and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${OUT:-bench/results}
work=${WORKDIR:-/tmp/qlora-kit-gpu-suite}
mkdir -p "$logs" "$work"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.cuda.get_device_name())" || exit 0
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0
bash bench/gpu_cuda_path.sh || status=1
python bench/train_step.py --gpu on --cpu off --rounds 1 --workdir "$work" 2>&1 | tee "$logs/train_step_gpu.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
tokenizer=${QLORA_KIT_TOKENIZER:-$HOME/.cache/qlora-kit/models/smollm2-135m-instruct}
for name in llama-1b llama-8b; do
  dir="$work/$name-profile"
  python - "$dir" "$name" <<'PY' || { status=1; continue; }
import sys
sys.path.insert(0, "bench")
from _common import synthetic_checkpoint
from train_step import GPU_MODELS
synthetic_checkpoint(__import__("pathlib").Path(sys.argv[1]), GPU_MODELS[sys.argv[2]], 2 * 1000**3)
PY
  if [ ! -f "$tokenizer/tokenizer.json" ]; then echo "no tokenizer at $tokenizer: profile of $name skipped"; status=1; continue; fi
  cp "$tokenizer"/tokenizer*.json "$dir"/
  qlora-kit profile recipes/smollm2_alpaca.yaml model.name_or_path="$dir" model.device=cuda lora.r=64 \
    data.max_samples=64 data.cutoff_len=512 train.micro_batch_size=4 --steps 3 --out "bench/results/profile_$name" \
    2>&1 | tee "$logs/profile_$name.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  [ "$logs" != bench/results ] && cp -r "bench/results/profile_$name" "$logs"/ 2>/dev/null
done
python bench/offload_gpu.py 2>&1 | tee "$logs/offload_gpu.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
[ "$logs" != bench/results ] && cp bench/results/offload_gpu.* bench/results/train_step.* "$logs"/ 2>/dev/null
exit $status
