#!/usr/bin/env bash
# The GPU checks, as run through the `device` tool on an H100/H200 that has torch and transformers but
# neither Ray nor DeepSpeed. Carry `.whl/` (see bench/gpu_env.sh); results land in $OUT.
set -euo pipefail
source bench/gpu_env.sh
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, deepspeed; print(torch.__version__, transformers.__version__, deepspeed.__version__)" | tee -a "$OUT/gpu.txt"
CHECKS=${CHECKS:-train distill}
if [[ " $CHECKS " == *" train "* ]]; then
  # Issue 3: the 2.3B teacher, bs 32, seq 128, bf16; engine without Ray against plain PyTorch.
  python3 bench/train_throughput.py --preset paper --model teacher_2p3b --batch 32 --seq 128 \
    --precision bf16 autocast_bf16 --zero ${ZERO:-0} --optimizer torch_fused_adamw --no-ray --isolate \
    --rounds "${ROUNDS:-2}" --steps "${STEPS:-15}" --json "$OUT/train_throughput.json" 2>&1 | tee "$OUT/train_throughput.log"
fi
if [[ " $CHECKS " == *" distill "* ]]; then
  # Issue 4: distillation steps, engine (no Ray) against plain PyTorch with the same teacher and student.
  python3 bench/distill_throughput.py --preset paper --teacher teacher_2p3b --student intermediate --batch 64 --seq 128 \
    --precision autocast_bf16 --optimizer torch_fused_adamw --rounds "${ROUNDS:-2}" --steps "${STEPS:-15}" \
    2>&1 | grep -v "Writing model shards" | tee "$OUT/distill_2p3b_170m.log"
  python3 bench/distill_throughput.py --preset paper --teacher intermediate --student final --batch 256 --seq 128 \
    --precision autocast_bf16 --optimizer torch_fused_adamw --rounds "${ROUNDS:-2}" --steps "${STEPS:-15}" \
    2>&1 | grep -v "Writing model shards" | tee "$OUT/distill_170m_17m.log"
fi
