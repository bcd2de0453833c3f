"""The whole pipeline: prepare -> teacher Stage 1 -> teacher Stage 2 (later stages as they land).

One machine, embedded default (local Ray, bundled data, minutes):
    python jobs/pipeline.py --preset tiny

Submitted to a Ray cluster:
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/pipeline.py --preset paper --run-dir /mnt/shared/runs/paper

A rerun skips finished stages and resumes an interrupted one from its last checkpoint.
"""

import sys
from pathlib import Path

# under `ray job submit --working-dir .` the uploaded checkout is imported, not an installed copy
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atm_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
