#!/usr/bin/env bash
# Issue 13 on a lent GPU (H100/H200 with torch and transformers, no Ray, no DeepSpeed): the `cpu` preset's
# masked-LM stages without Ray (`run_stages(..., use_ray=False)`, the same engine loop) at its own shapes and at
# bigger ones, then fine-tuning of the scratch baseline and the final student on SNIPS and SLURP over 3 seeds
# (bench/nlu_quality.py --no-ray on the GPU, each seed and dataset in its own process).
#
# Carry `.whl/` (see bench/gpu_env.sh) and the corpora
# the preset reads, laid out as in ../shared/data, in `.gpu_data/` (and, optionally, `atm-ray prepare --preset cpu`'s
# folder in `.gpu_prep/`). Results land in $OUT.
#   VARIANTS="cpu wide" STEPS_SCALE=1 bash bench/gpu_quality.sh
set -uo pipefail
source bench/gpu_env.sh
if [ -d .gpu_data ] && [ ! -e ../shared/data ]; then
  mkdir -p ../shared && ln -s "$PWD/.gpu_data" ../shared/data
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || echo "no GPU" > "$OUT/gpu.txt"
VARIANTS=${VARIANTS:-"cpu narrow wide"}
SEEDS=${SEEDS:-"0 1 2"}
STEPS_SCALE=${STEPS_SCALE:-1}   # <1 for a quick rehearsal on a CPU machine

overrides_for() {  # the preset's values that a variant changes
  case "$1" in
    cpu) echo "" ;;
    # the tiny preset's proven width (4x128, lr 2e-3) on the full corpora
    narrow) for m in teacher intermediate final; do echo -n "models.$m.hidden_size=128 models.$m.intermediate_size=512 "; done
            echo "pretrain.stage1.engine.learning_rate=2e-3 pretrain.stage2.engine.learning_rate=2e-3" ;;
    # what a GPU affords in the same steps: 6x512 teacher, 3x512 and 1x512 students, 4x the batch
    wide) echo -n "models.teacher.num_layers=6 models.intermediate.num_layers=3 "
          for m in teacher intermediate final; do echo -n "models.$m.hidden_size=512 models.$m.num_heads=8 models.$m.intermediate_size=2048 "; done
          for s in pretrain.stage1 pretrain.stage2 distill.intermediate distill.continuation distill.final; do echo -n "$s.engine.micro_batch_size=128 "; done
          echo "pretrain.stage1.engine.learning_rate=5e-4 pretrain.stage2.engine.learning_rate=5e-4" ;;
  esac
}

scaled_steps() {  # STEPS_SCALE applied to every masked-LM stage's steps, evaluation and checkpoint intervals
  python3 - "$STEPS_SCALE" <<'EOF'
import sys
from atm_ray.config import load_config
scale = float(sys.argv[1])
if scale != 1:
    config = load_config("cpu")
    for section, stages in (("pretrain", ("stage1", "stage2")), ("distill", ("intermediate", "continuation", "final"))):
        for stage in stages:
            settings = getattr(getattr(config, section), stage)
            for field in ("steps", "eval_every", "checkpoint_every"):
                print(f"{section}.{stage}.{field}={max(2, int(getattr(settings, field) * scale))}", end=" ")
    print(f"distill.intermediate.switch.max_steps={max(2, int(config.distill.intermediate.switch.max_steps * scale))}",
          f"finetune.max_epochs={max(1, int(config.finetune.max_epochs * scale))}")
EOF
}
SCALED=$(scaled_steps)

train_variant() {
  local variant=$1
  # shellcheck disable=SC2046
  python3 - "$variant" $(overrides_for "$variant") $SCALED <<'EOF'
import sys, time
from atm_ray.utils import console_logging
from atm_ray.config import load_config
from atm_ray.train.stage_table import MASKED_LM_STAGES
from atm_ray.train.stages import run_stages
console_logging(False)
variant, overrides = sys.argv[1], sys.argv[2:]
config = load_config("cpu", [*overrides, f"run_dir=runs/gpu_{variant}"])
started = time.perf_counter()
for result in run_stages(config, MASKED_LM_STAGES, use_ray=False):
    print(result.summary(), flush=True)
print(f"{variant}: masked-LM stages in {time.perf_counter() - started:.0f} s", flush=True)
EOF
}

started=$SECONDS
for variant in $VARIANTS; do
  # a prepare folder made elsewhere with the same data settings (its hash is checked) saves the device's minutes
  if [ -d .gpu_prep ] && [ ! -d "runs/gpu_$variant/prepare" ]; then mkdir -p "runs/gpu_$variant" && cp -r .gpu_prep "runs/gpu_$variant/prepare"; fi
  (train_variant "$variant" > "$OUT/train_$variant.log" 2>&1; echo "exit $?" >> "$OUT/train_$variant.log") &
done
wait
echo "masked-LM stages of all variants: $((SECONDS - started)) s" | tee -a "$OUT/summary.txt"

for variant in $VARIANTS; do
  for dataset in snips slurp_devel; do
    for seed in $SEEDS; do
      # shellcheck disable=SC2046
      # the overrides first: --seeds and --models take every word after them
      (OMP_NUM_THREADS=1 python3 bench/nlu_quality.py $(overrides_for "$variant") $SCALED --preset cpu \
        --run-dir "runs/gpu_$variant" --no-ray --models scratch final --datasets "$dataset" --seeds "$seed" \
        > "runs/gpu_$variant.$dataset.$seed.log" 2>&1) &
    done
  done
done
# the device's minutes are few: fine-tunings still running at the deadline are stopped, and what finished is kept
while [ -n "$(jobs -rp)" ] && [ $((SECONDS - started)) -lt "${DEADLINE:-480}" ]; do sleep 5; done
[ -n "$(jobs -rp)" ] && { echo "deadline: stopping $(jobs -rp | wc -l) fine-tunings" | tee -a "$OUT/summary.txt"; kill $(jobs -rp); }
echo "fine-tuning: $((SECONDS - started)) s" | tee -a "$OUT/summary.txt"
for variant in $VARIANTS; do
  grep -h " seed " runs/gpu_"$variant".*.log > "$OUT/quality_$variant.log"
  tail -n 3 runs/gpu_"$variant".*.log | grep -i "error\|Traceback" >> "$OUT/quality_$variant.log"
  if [ "$(grep -c " seed " "$OUT/quality_$variant.log")" -eq $((4 * $(echo $SEEDS | wc -w))) ]; then
    # every fine-tuning stage is done: this only scores the test sets and writes the table
    # shellcheck disable=SC2046
    OMP_NUM_THREADS=4 timeout 120 python3 bench/nlu_quality.py $(overrides_for "$variant") $SCALED --preset cpu \
      --run-dir "runs/gpu_$variant" --no-ray --models scratch final --seeds $SEEDS 2>&1 | grep -v " seed " >> "$OUT/quality_$variant.log"
  fi
done
echo "total: $((SECONDS - started)) s" | tee -a "$OUT/summary.txt"
