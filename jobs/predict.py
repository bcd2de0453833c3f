"""Batch prediction over a file with a fine-tuned model (Ray Data, a pool of model actors).

One machine (small files are parsed in this process, large ones through a local Ray):
    python jobs/predict.py --model runs/tiny/finetune_student/export --input utterances.txt --output answers.jsonl

Submitted to a running Ray:
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/predict.py --ray --actors 8 --model /mnt/shared/runs/paper/finetune_student/export \
        --input /mnt/data/utterances.parquet --output /mnt/shared/predictions.parquet

Input: .txt (one utterance a line), .jsonl (a "text" field) or .parquet (a "text" column); output .jsonl or
.parquet with the endpoint's fields per utterance. A malformed line stops the run with FILE:LINE, or with
`--on-error skip` is left out and reported.
"""

import sys
from pathlib import Path

# under `ray job submit --working-dir .` the uploaded checkout is imported, not an installed copy
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atm_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
