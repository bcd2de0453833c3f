"""The whole pipeline, one stage after another; finished stages are skipped, interrupted ones resume.

Stages so far: prepare -> teacher Stage 1 -> teacher Stage 2 -> intermediate distillation (Stage-1 then
Stage-2 teacher) -> intermediate in-domain continuation -> final distillation.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from atm_ray.config import Config
from atm_ray.distill import run_distill
from atm_ray.prepare import format_summary, prepare
from atm_ray.pretrain import run_pretrain_stage

logger = logging.getLogger(__name__)


def run_pipeline(config: Config, run_dir: Path | None = None) -> Path:
    run_dir = Path(run_dir or config.resolved_run_dir())
    started = time.perf_counter()
    print(f"[pipeline] preset {config.name}, run folder {run_dir.resolve()}", flush=True)

    print("[pipeline] 1/5 prepare: tokenizer and MLM shards", flush=True)
    print(format_summary(prepare(config, run_dir)), flush=True)

    for stage in (1, 2):
        print(f"[pipeline] {stage + 1}/5 teacher pretraining, Stage {stage}", flush=True)
        print(run_pretrain_stage(config, stage, run_dir).summary(), flush=True)

    for number, student in ((4, "intermediate"), (5, "final")):
        print(f"[pipeline] {number}/5 distillation: {student} student", flush=True)
        for result in run_distill(config, student, run_dir):
            print(result.summary(), flush=True)

    print(f"[pipeline] done in {time.perf_counter() - started:.0f} s; artifacts in {run_dir.resolve()}", flush=True)
    return run_dir
