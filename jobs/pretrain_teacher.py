"""Teacher pretraining, Stage 1 (written text) or Stage 2 (spoken in-domain, from Stage 1).

One machine (starts a local Ray when no cluster is given):
    python jobs/pretrain_teacher.py --stage 1 --preset tiny
    python jobs/pretrain_teacher.py --stage 2 --preset tiny

Submitted to a running Ray (a local head from `ray start --head`, or a cluster from `ray up cluster.yaml`):
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/pretrain_teacher.py --stage 1 --preset tiny
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/pretrain_teacher.py --stage 1 --preset paper \
        --run-dir /mnt/shared/runs/paper cluster.storage_path=s3://my-bucket/atm-ray

Overrides are `key.sub=value`, e.g. `pretrain.stage1.steps=1000 cluster.num_workers=8`.
"""

import sys
from pathlib import Path

# under `ray job submit --working-dir .` the uploaded checkout is imported, not an installed copy
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atm_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
