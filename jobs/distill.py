"""Distillation: `--student intermediate` distils the intermediate student from the Stage-1 teacher, switches
to the Stage-2 teacher on a plateau, then continues it on in-domain spoken text; `--student final` distils
the final student from it (MLM + soft cross-entropy + hidden-state matching).

One machine (starts a local Ray when no cluster is given; the teacher stages must have finished):
    python jobs/distill.py --student intermediate --preset tiny
    python jobs/distill.py --student final --preset tiny

Submitted to a running Ray:
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/distill.py --student intermediate --preset paper --run-dir /mnt/shared/runs/paper

Overrides are `key.sub=value`, e.g. `distill.final.weights.hidden=2.0 distill.intermediate.temperature=1.0`.
"""

import sys
from pathlib import Path

# under `ray job submit --working-dir .` the uploaded checkout is imported, not an installed copy
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atm_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
