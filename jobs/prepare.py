"""Prepare stage: train the tokenizer and pack MLM shards.

One machine (a local Ray is not needed for this stage):
    python jobs/prepare.py --preset tiny

On a cluster (the run folder must be on storage every node sees):
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/prepare.py --preset paper --run-dir /mnt/shared/runs/paper
"""

import sys

from atm_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
