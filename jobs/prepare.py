"""Prepare stage: train the tokenizer and pack MLM shards.

One machine (a local Ray is not needed for this stage):
    python jobs/prepare.py --preset tiny

On a cluster (the run folder must be on storage every node sees):
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/prepare.py --preset paper --run-dir /mnt/shared/runs/paper
"""

import sys
from pathlib import Path

# under `ray job submit --working-dir .` the uploaded checkout is imported, not an installed copy
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atm_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
