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
import threading
import time
from pathlib import Path

from atm_ray.config import Config
from atm_ray.data.prepare import format_summary, prepare
from atm_ray.nlu.evaluate import compare_models, comparison_report, write_comparison
from atm_ray.nlu.finetune import FinetunePlan, NluData, finetune_summary, load_nlu_data, plan_finetune, run_finetune_stage
from atm_ray.report import write_report
from atm_ray.train.engine import EXPORT_DIR
from atm_ray.train.runner import up_to_date
from atm_ray.train.stage_table import FINAL_DISTILL, FINETUNE_SCRATCH, FINETUNE_STUDENT, MASKED_LM_STAGES, STAGES
from atm_ray.train.stages import make_plan, run_stage
from atm_ray.train.teachers import check_teachers

logger = logging.getLogger(__name__)


def side_by_side(config: Config) -> Config | None:
    """The configuration under which two fine-tunings fit on the cluster at once, or None: where the
    cluster cannot give both their ``cluster.cpus_per_worker``, each gets half (the stage's hash does not
    include it: a later standalone ``atm-ray finetune`` still finds the stage up to date); GPUs are not split."""
    import ray

    from atm_ray.cluster import init_ray

    cluster, workers = config.cluster, config.finetune.num_workers
    init_ray(cluster.address)
    resources = ray.cluster_resources()
    if cluster.use_gpu and resources.get("GPU", 0) < 2 * (cluster.gpus_per_worker or 1) * workers:
        return None
    if resources.get("CPU", 0) >= 2 * cluster.cpus_per_worker * workers:
        return config
    return config.model_copy(update={"cluster": cluster.model_copy(update={"cpus_per_worker": cluster.cpus_per_worker / 2})})


def run_finetunings(config: Config, plans: dict[str, FinetunePlan], data: NluData) -> dict[str, dict]:
    """Run the fine-tunings that are not up to date; returns each one's manifest.

    They share nothing, so two run side by side where they fit (``side_by_side``): on a 2-core machine a
    model this small gains little from a second thread, and each Ray Train run spends its first half-minute
    starting actors."""
    import ray

    manifests = {name: up_to_date(plan.stage_dir, plan.config_hash) for name, plan in plans.items()}
    pending = [name for name, manifest in manifests.items() if not manifest]
    together = side_by_side(config) if len(pending) > 1 else None
    if together is None:
        manifests.update({name: run_finetune_stage(config, plans[name], data) for name in pending})
    else:
        outcomes: dict = {}

        def run(name: str) -> None:
            try:
                outcomes[name] = run_finetune_stage(together, plans[name], data)
            except BaseException as error:  # noqa: BLE001 - raised again in the main thread below
                outcomes[name] = error

        # daemon threads: after a Ctrl-C a thread may stay blocked in ray.get on a Ray that is gone, and
        # the program must not wait for it on its way out
        threads = [threading.Thread(target=run, args=(name,), name=f"fine-tuning {name}", daemon=True) for name in pending]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                thread.join()
        except KeyboardInterrupt:
            # Ray Train's own Ctrl-C handler lives only in the main thread, which waits here: ending this
            # program's Ray ends both runs (each resumes from its last epoch's checkpoint)
            ray.shutdown()
            raise
        for name in pending:
            if isinstance(outcomes[name], BaseException):
                raise outcomes[name]
            manifests[name] = outcomes[name]
    for manifest in manifests.values():
        logger.info("%s", finetune_summary(manifest))
    return manifests


def run_pipeline(config: Config, run_dir: Path | None = None) -> Path:
    run_dir = Path(run_dir or config.resolved_run_dir())
    started = time.perf_counter()
    steps = 1 + len(MASKED_LM_STAGES) + 2 + 2  # prepare, the masked-LM stages, two fine-tunings, evaluation, report
    step = 0

    def announce(what: str) -> None:
        nonlocal step
        step += 1
        logger.info("[pipeline] %d/%d %s", step, steps, what)

    logger.info("[pipeline] preset %s, run folder %s", config.name, run_dir.resolve())
    check_teachers(config)  # teachers the user brought, refused before any work if they cannot be used
    announce("prepare: tokenizer and MLM shards")
    prepared = prepare(config, run_dir)
    logger.debug("%s", format_summary(prepared))  # `atm-ray prepare` prints it whole

    for name in MASKED_LM_STAGES:
        announce(f"{name}: {STAGES[name].description}")
        logger.info("%s", run_stage(config, make_plan(config, prepared, run_dir, name), prepared).summary())

    data = load_nlu_data(config.finetune, config.data.root, config.data.strict, config.seed)
    student = run_dir / FINAL_DISTILL / EXPORT_DIR
    plans = {name: plan_finetune(config, data, student, name, name == FINETUNE_SCRATCH, run_dir)
             for name in (FINETUNE_SCRATCH, FINETUNE_STUDENT)}
    for name in plans:
        announce(f"{name}: fine-tuning of the {STAGES[name].description}")
    exports = {name: manifest["outputs"]["export"] for name, manifest in run_finetunings(config, plans, data).items()}

    announce("evaluation: pipeline student against the scratch baseline")
    description = f"the test split of preset {config.name} ({len(data.test)} utterances)"
    result = compare_models({"scratch": exports[FINETUNE_SCRATCH], "student": exports[FINETUNE_STUDENT]}, data.test, "scratch")
    logger.info("%s", comparison_report(result, description))
    write_comparison(result, run_dir / "evaluation", description)

    announce("report")
    logger.info("report: %s", write_report(run_dir))

    logger.info("[pipeline] done in %.0f s; artifacts in %s", time.perf_counter() - started, run_dir.resolve())
    return run_dir
