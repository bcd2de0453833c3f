"""Ray Tune sweep of a distillation stage's loss weights, temperature and learning rate (ASHA on the
held-out mask-filling accuracy by default; the search space and settings are `sweep.*` in the preset).
The stages a sweep needs (prepare, teachers, and for `final` the intermediate student) run first when
they have not finished.

One machine (starts a local Ray when no cluster is given):
    python jobs/sweep.py --preset tiny --student final

Submitted to a running Ray:
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/sweep.py --preset paper --student final --run-dir /mnt/shared/runs/paper \
        sweep.num_samples=32 sweep.max_concurrent_trials=8 sweep.cpus_per_trial=1 sweep.gpus_per_worker=1

An interrupted sweep resumes when the same command runs again (`Tuner.restore`: finished trials are
kept). Results: `<run>/sweep_<student>/results.{csv,md}`, `metric_vs_params.png`, TensorBoard logs in
`tune/`, and `best_overrides.yaml` for `atm-ray distill|pipeline --overrides-file`.
"""

import sys
from pathlib import Path

# under `ray job submit --working-dir .` the uploaded checkout is imported, not an installed copy
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atm_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
