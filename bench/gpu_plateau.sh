#!/usr/bin/env bash
# Plateau grid on a GPU machine (no Ray, no DeepSpeed needed): carry `.whl/` (pydantic and its wheels)
# and `runs/` (prepared shards from `atm-ray prepare`, see bench/mlm_plateau.py). Results land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/atm-ray-gpu}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name --format=csv,noheader
TINY='[{"layers":4,"hidden":128,"lr":1e-3},{"layers":4,"hidden":128,"lr":2e-3},{"layers":4,"hidden":128,"lr":5e-3},
{"layers":2,"hidden":128,"lr":2e-3},{"layers":2,"hidden":128,"lr":5e-3},
{"layers":2,"hidden":64,"heads":2,"lr":2e-3},{"layers":2,"hidden":64,"heads":2,"lr":5e-3},{"layers":4,"hidden":64,"heads":2,"lr":5e-3}]'
P="--prepared runs/plateau_v1000_s32/prepare --prepared runs/plateau_v1000_s64/prepare --prepared runs/plateau_v2000_s64/prepare"
timeout 230 python3 bench/mlm_plateau.py $P --train spoken --grid "$TINY" --steps 3000 --eval-every 100 --jobs 14 --threads 1 --jsonl $OUT/tiny_spoken.jsonl &
sleep 1
CPU='[{"layers":4,"hidden":256,"lr":1e-3},{"layers":4,"hidden":256,"lr":2e-3},{"layers":4,"hidden":128,"lr":2e-3},{"layers":4,"hidden":128,"lr":5e-3}]'
timeout 230 python3 bench/mlm_plateau.py --prepared runs/plateau_cpu_v2000_s64/prepare --prepared runs/plateau_cpu_v8000_s64/prepare \
  --train spoken --grid "$CPU" --steps 4000 --eval-every 200 --jobs 8 --threads 1 --jsonl $OUT/cpu_spoken.jsonl &
wait
W='[{"layers":4,"hidden":128,"lr":2e-3},{"layers":4,"hidden":128,"lr":5e-3},{"layers":4,"hidden":256,"lr":1e-3},{"layers":4,"hidden":256,"lr":2e-3}]'
timeout 150 python3 bench/mlm_plateau.py --prepared runs/plateau_v1000_s64/prepare --prepared runs/plateau_cpu_v8000_s64/prepare \
  --train written --grid "$W" --steps 4000 --eval-every 200 --jobs 8 --threads 1 --jsonl $OUT/written.jsonl
