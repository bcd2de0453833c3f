"""Joint intent + slot fine-tuning of a student (or of the scratch baseline) under Ray Train.

One machine (starts a local Ray when no cluster is given):
    python jobs/finetune.py --preset tiny                                # the run's final student, preset data
    python jobs/finetune.py --preset tiny --scratch                      # same architecture, random weights
    python jobs/finetune.py --model runs/tiny/final_distill/export --data jointbert:../shared/data/nlu/snips
    python jobs/finetune.py --model DIR --data slurp:../shared/data/nlu/slurp/devel.jsonl --freeze-encoder

Submitted to a running Ray:
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/finetune.py --preset paper --run-dir /mnt/shared/runs/paper --data xsid:/mnt/data/xsid/de.valid.conll

`--data FORMAT:PATH` (repeatable, several languages at once) replaces the preset's `finetune.train`; a
JointBERT folder with train/dev/test inside gives all three splits; otherwise `--dev`/`--test` or held-out
shares of the training data. Scores: `python -m atm_ray.cli evaluate --models scratch=DIR student=DIR`.
"""

import sys
from pathlib import Path

# under `ray job submit --working-dir .` the uploaded checkout is imported, not an installed copy
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atm_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
