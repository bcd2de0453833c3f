"""The whole pipeline: prepare -> teacher Stage 1 -> teacher Stage 2 -> intermediate distillation and
in-domain continuation -> final distillation -> fine-tuning (student and scratch baseline) -> evaluation
-> report (`<run>/report.md`).

One machine, embedded default (local Ray, bundled data, minutes):
    python jobs/pipeline.py --preset tiny

Submitted to a Ray cluster:
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/pipeline.py --preset paper --run-dir /mnt/shared/runs/paper

A rerun skips finished stages, resumes an interrupted one from its last checkpoint, and reruns a stage
whose settings changed together with the stages after it. With a sweep's result:
    python jobs/pipeline.py --preset tiny --overrides-file runs/tiny/sweep_final/best_overrides.yaml
"""

import sys
from pathlib import Path

# under `ray job submit --working-dir .` the uploaded checkout is imported, not an installed copy
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atm_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
