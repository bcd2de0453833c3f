"""The whole pipeline, one stage after another; finished stages are skipped, interrupted ones resume.

Stages: prepare -> teacher Stage 1 -> teacher Stage 2 -> intermediate distillation (Stage-1 then Stage-2
teacher) -> intermediate in-domain continuation -> final distillation -> fine-tuning of the final student
and of the scratch baseline (same architecture, random weights) -> evaluation (relative error against the
baseline, in ``<run>/evaluation/comparison.md``) -> report (``<run>/report.md`` with plots; ``atm-ray report``
rebuilds it).

Each stage's manifest holds the hash of its settings and of every stage it depends on, so a rerun skips
what is up to date, resumes an interrupted stage from its last checkpoint, and reruns a changed stage and
the stages after it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from atm_ray.config import Config
from atm_ray.train.distill import run_distill
from atm_ray.train.engine import EXPORT_DIR
from atm_ray.nlu.evaluate import compare_models, comparison_report, write_comparison
from atm_ray.nlu.finetune import finetune_summary, load_nlu_data, plan_finetune, run_finetune_stage
from atm_ray.data.prepare import format_summary, prepare
from atm_ray.train.pretrain import run_pretrain_stage
from atm_ray.report import write_report

logger = logging.getLogger(__name__)


def run_pipeline(config: Config, run_dir: Path | None = None) -> Path:
    run_dir = Path(run_dir or config.resolved_run_dir())
    started = time.perf_counter()
    print(f"[pipeline] preset {config.name}, run folder {run_dir.resolve()}", flush=True)

    print("[pipeline] 1/9 prepare: tokenizer and MLM shards", flush=True)
    print(format_summary(prepare(config, run_dir)), flush=True)

    for stage in (1, 2):
        print(f"[pipeline] {stage + 1}/9 teacher pretraining, Stage {stage}", flush=True)
        print(run_pretrain_stage(config, stage, run_dir).summary(), flush=True)

    for number, student in ((4, "intermediate"), (5, "final")):
        print(f"[pipeline] {number}/9 distillation: {student} student", flush=True)
        for result in run_distill(config, student, run_dir):
            print(result.summary(), flush=True)

    data = load_nlu_data(config.finetune, config.data.root, config.data.strict, config.seed)
    student = run_dir / "final_distill" / EXPORT_DIR
    exports = {}
    for number, name, scratch in ((6, "finetune_scratch", True), (7, "finetune_student", False)):
        print(f"[pipeline] {number}/9 fine-tuning: {'scratch baseline' if scratch else 'pipeline student'}", flush=True)
        manifest = run_finetune_stage(config, plan_finetune(config, data, student, name, scratch, run_dir), data)
        exports[name.removeprefix("finetune_")] = manifest["outputs"]["export"]
        print(finetune_summary(manifest), flush=True)

    print("[pipeline] 8/9 evaluation: pipeline student against the scratch baseline", flush=True)
    description = f"the test split of preset {config.name} ({len(data.test)} utterances)"
    result = compare_models({"scratch": exports["scratch"], "student": exports["student"]}, data.test, "scratch")
    print(comparison_report(result, description), flush=True)
    write_comparison(result, run_dir / "evaluation", description)

    print("[pipeline] 9/9 report", flush=True)
    print(f"report: {write_report(run_dir)}", flush=True)

    print(f"[pipeline] done in {time.perf_counter() - started:.0f} s; artifacts in {run_dir.resolve()}", flush=True)
    return run_dir
