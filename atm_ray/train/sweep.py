"""Ray Tune sweeps of a distillation stage's loss weights, temperature and learning rate.

Each trial is the distillation stage itself (``intermediate_distill`` or ``final_distill``) run by its own
Ray Train ``TorchTrainer``; Ray Train's reports reach Tune through ``TuneReportCallback``, and ASHA stops
trials whose held-out metric trails the others at a rung. A sweep lives in ``<run>/sweep_<student>/``:

    sweep.json                 what was swept and the settings' hash (a rerun with other settings is refused)
    tune/                      Tune's experiment (``Tuner.restore`` resumes it; TensorBoard logs per trial)
    trials/<trial id>/         each trial's Ray Train run, export, metrics and manifest
    trial_starts.jsonl         one line each time a trial function starts (a restored sweep adds lines
                               only for the trials it had not finished)
    results.csv, results.md    one row per trial: status, steps reached, swept values, metrics
    metric_vs_params.png       the metric against each swept value
    best_overrides.yaml        the best trial's values as an override file:
                               ``atm-ray distill|pipeline --overrides-file best_overrides.yaml``

An interrupted sweep (Ctrl-C, a lost driver) resumes when the same command runs again: Tune restores the
experiment, keeps finished trials and finishes the others (a trial's Ray Train run resumes from its
last checkpoint).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from atm_ray.config import DOWNSTREAM_METRICS, HELDOUT_DIRECTIONS, LOSS_TERMS, Config, ConfigError, SweepConfig, apply_override
from atm_ray.train.runner import stage_hash
from atm_ray.train.stage_table import DISTILL_STAGES, PREPARE, ancestors
from atm_ray.utils import atomic_write_json, atomic_write_text, read_json, settings_hash

logger = logging.getLogger(__name__)

EXPERIMENT = "tune"
BEST_OVERRIDES = "best_overrides.yaml"
HELDOUT_METRICS = tuple(HELDOUT_DIRECTIONS)


class SweepInterrupted(RuntimeError):
    """The sweep stopped before every trial ended; running the same command again resumes it."""


def known_metrics() -> set[str]:
    return {*LOSS_TERMS, *(f"{kind}/{name}" for kind in ("written", "spoken") for name in HELDOUT_METRICS)}


def trial_config(config: Config, student: str, params: dict[str, float]) -> Config:
    """The configuration one trial runs: ``params`` (keys under ``distill.<student>``) applied, the trial
    length and resources from ``config.sweep``, and a checkpoint at every evaluation (every report then
    carries the metric ASHA compares)."""
    sweep = config.sweep
    tree = config.model_dump(mode="json")
    for key, value in params.items():
        apply_override(tree, ["distill", student, *key.split(".")], value)
    stage = tree["distill"][student]
    stage["steps"] = sweep.steps or stage["steps"]
    stage["eval_every"] = min(sweep.eval_every or stage["eval_every"], stage["steps"])
    stage["checkpoint_every"] = stage["eval_every"]
    tree["cluster"].update(
        num_workers=sweep.num_workers,
        cpus_per_worker=sweep.cpus_per_worker,
        gpus_per_worker=sweep.gpus_per_worker,
        use_gpu=sweep.gpus_per_worker > 0,
        max_failures=0,
    )
    try:
        return Config.model_validate(tree)
    except Exception as error:  # pydantic's ValidationError, or a value of the wrong type
        raise ConfigError(f"sweep.space {sorted(params)}: the trial configuration is invalid: {error}") from None


def check_sweep(config: Config) -> None:
    """Refuse a sweep that cannot run before any trial starts: unknown keys, invalid values, an unknown metric."""
    sweep = config.sweep
    for key, parameter in sweep.space.items():
        samples = parameter.values if parameter.values is not None else [parameter.low, parameter.high]
        for value in samples:
            try:
                trial_config(config, sweep.student, {key: value})
            except ConfigError:
                raise ConfigError(
                    f"sweep.space.{key}: value {value} does not fit distill.{sweep.student}.{key} "
                    f"(an unknown key, or a value out of range)"
                ) from None
    allowed = known_metrics()
    if sweep.metric not in allowed:
        raise ConfigError(f"sweep.metric: {sweep.metric!r} is not reported during distillation; one of {sorted(allowed)}")
    select_by = sweep.select_by or sweep.metric
    if select_by not in allowed | set(DOWNSTREAM_METRICS):
        raise ConfigError(f"sweep.select_by: {select_by!r} is neither a distillation metric nor one of {DOWNSTREAM_METRICS}")


def sweep_hash(config: Config, upstream_hash: str) -> str:
    sections = {
        "sweep": config.sweep.model_dump(mode="json"),
        "stage": getattr(config.distill, config.sweep.student).model_dump(mode="json"),
        "models": config.models[getattr(config.distill, config.sweep.student).student].model_dump(),
        "upstream": upstream_hash,
        "seed": config.seed,
    }
    return settings_hash(sections)


def param_space(sweep: SweepConfig) -> dict:
    from ray import tune

    space = {}
    for key, parameter in sweep.space.items():
        if sweep.search == "grid":
            space[key] = tune.grid_search(list(parameter.values))
        elif parameter.values is not None:
            space[key] = tune.choice(list(parameter.values))
        elif parameter.log:
            space[key] = tune.loguniform(parameter.low, parameter.high)
        else:
            space[key] = tune.uniform(parameter.low, parameter.high)
    return {"params": space}


# ---------------------------------------------------------------------- one trial (runs in a Tune actor)


def run_trial(trial_params: dict, context: dict) -> None:
    """Tune's trial function: the distillation stage with this trial's values, on its own Ray Train run."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from atm_ray.data.prepare import PreparedData
    from atm_ray.train.stages import make_plan, run_stage

    params = trial_params["params"]
    student = context["student"]
    config = trial_config(Config.model_validate(context["config"]), student, params)
    run_dir, sweep_dir = Path(context["run_dir"]), Path(context["sweep_dir"])
    trial_id = tune.get_context().get_trial_id()
    with open(sweep_dir / "trial_starts.jsonl", "a") as handle:
        handle.write(json.dumps({"trial_id": trial_id, "params": params, "time": time.time()}) + "\n")

    prepared = PreparedData(run_dir / "prepare")
    plan = make_plan(config, prepared, run_dir, DISTILL_STAGES[student][0])  # the distillation, not what follows it
    plan = replace(plan, stage_dir=str((sweep_dir / "trials" / trial_id).resolve()))
    result = run_stage(config, plan, prepared, callbacks=[TuneReportCallback()])
    final = {**result.metrics}
    if config.sweep.downstream is not None:
        final.update(downstream_scores(config, result.export_dir, Path(plan.stage_dir)))
    tune.report(final)  # the last evaluation again (a restored, already finished trial reports nothing else)


def downstream_scores(config: Config, export_dir: Path, trial_dir: Path) -> dict[str, float]:
    """A short fine-tune of the trial's student on ``finetune``'s data, in this process; dev scores."""
    from atm_ray.nlu.finetune import NluData, load_nlu_data, plan_finetune, run_finetune_stage

    downstream = config.sweep.downstream
    config = config.model_copy(deep=True)
    config.finetune.max_epochs = downstream.epochs
    config.finetune.min_steps = 0  # the probe is its few epochs, however few steps they make
    data = load_nlu_data(config.finetune, config.data.root, config.data.strict, config.seed)
    data = NluData(data.train[: downstream.max_train_records], data.dev, data.test, data.reports)
    manifest = run_finetune_stage(config, plan_finetune(config, data, export_dir, "downstream", False, trial_dir), data, use_ray=False)
    return {f"downstream/{name}": manifest["metrics"][f"dev/{name}"] for name in ("intent_accuracy", "slot_f1", "exact_match")}


# ---------------------------------------------------------------------- the sweep


@dataclass
class SweepResult:
    sweep_dir: Path
    rows: list[dict]
    best: dict | None
    files: dict[str, Path] = field(default_factory=dict)
    skipped: bool = False

    def summary(self) -> str:
        finished = sum(row["status"] == "finished" for row in self.rows)
        stopped = sum(row["status"].startswith("stopped") for row in self.rows)
        errors = sum(row["status"] == "error" for row in self.rows)
        lines = [
            f"sweep {'up to date' if self.skipped else 'finished'}: {len(self.rows)} trials "
            f"({finished} ran to the end, {stopped} stopped early by ASHA, {errors} errors) in {self.sweep_dir}"
        ]
        if self.best:
            lines.append(f"  best trial {self.best['trial_id']}: {self.best['select_by']} = {self.best['value']:.4f}")
        lines += [f"  {name}: {path}" for name, path in self.files.items()]
        return "\n".join(lines)


def ensure_upstream(config: Config, student: str, run_dir: Path) -> str:
    """Run (or skip, when finished) the stages a sweep's trials need; returns their combined hash."""
    from atm_ray.train.stages import run_stages

    upstream = ancestors(DISTILL_STAGES[student][0])
    run_stages(config, upstream, run_dir)
    hashes = [stage_hash(run_dir / name) for name in [PREPARE, *upstream]]
    return settings_hash({"upstream": hashes})


def run_sweep(config: Config, run_dir: Path | None = None, name: str | None = None, fresh: bool = False) -> SweepResult:
    """Run the sweep ``config.sweep`` describes, or resume it, or (when it finished) rebuild its report."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from atm_ray.cluster import init_ray

    sweep = config.sweep
    check_sweep(config)
    run_dir = Path(run_dir or config.resolved_run_dir())
    sweep_dir = (run_dir / (name or f"sweep_{sweep.student}")).resolve()
    if fresh:
        shutil.rmtree(sweep_dir, ignore_errors=True)
    state_file = sweep_dir / "sweep.json"
    state = read_json(state_file) if state_file.is_file() else None
    if not (state and state.get("finished")):
        # (a finished sweep needs no Ray: its outputs are rebuilt from its records)
        init_ray(config.cluster.address)
    upstream_hash = ensure_upstream(config, sweep.student, run_dir)
    config_hash = sweep_hash(config, upstream_hash)
    if state is not None:
        if state["config_hash"] != config_hash:
            raise ConfigError(
                f"{sweep_dir} holds a sweep with other settings (hash {state['config_hash']}, now {config_hash}); "
                "pass --name for a new sweep, or --fresh to replace it"
            )
        if state.get("finished"):
            return _collect(config, sweep_dir, read_json(sweep_dir / "trials.json"), skipped=True)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        state_file,
        {"config_hash": config_hash, "student": sweep.student, "sweep": sweep.model_dump(mode="json"), "finished": False},
    )

    stage_steps = sweep.steps or getattr(config.distill, sweep.student).steps
    eval_every = min(sweep.eval_every or getattr(config.distill, sweep.student).eval_every, stage_steps)
    if sweep.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="step",
            metric=sweep.metric,
            mode=sweep.mode,
            max_t=stage_steps,
            grace_period=sweep.grace_period or min(2 * eval_every, stage_steps),
            reduction_factor=sweep.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    concurrency = _concurrency(sweep)
    context = {"config": config.model_dump(mode="json"), "student": sweep.student, "run_dir": str(run_dir.resolve()),
               "sweep_dir": str(sweep_dir)}
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), {"CPU": sweep.cpus_per_trial})
    experiment = sweep_dir / EXPERIMENT
    if tune.Tuner.can_restore(str(experiment)):
        logger.info("[sweep] resuming the interrupted sweep in %s", sweep_dir)
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True, restart_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(sweep),
            tune_config=tune.TuneConfig(
                num_samples=sweep.num_samples,
                scheduler=scheduler,
                search_alg=BasicVariantGenerator(random_state=config.seed, max_concurrent=concurrency),
            ),
            run_config=tune.RunConfig(
                name=EXPERIMENT,
                storage_path=str(sweep_dir),
                failure_config=tune.FailureConfig(max_failures=0),
                verbose=1,
            ),
        )
    tuner.fit()
    # Tune's own record of each trial (a trial cut short by Ctrl-C looks like an error in the ResultGrid)
    trials = tune.ExperimentAnalysis(str(experiment)).trials
    ended = [trial for trial in trials if trial.status in ("TERMINATED", "ERROR")]
    expected = expected_trials(sweep)
    if len(ended) < expected:
        raise SweepInterrupted(
            f"sweep interrupted with {len(ended)} of {expected} trials ended; run the same command again to resume it "
            f"({sweep_dir})"
        )
    rows = _rows(trials, stage_steps)
    atomic_write_json(sweep_dir / "trials.json", rows)
    result = _collect(config, sweep_dir, rows)
    state = read_json(state_file)
    atomic_write_json(state_file, {**state, "finished": True, "best": result.best})
    return result


def expected_trials(sweep: SweepConfig) -> int:
    if sweep.search == "random":
        return sweep.num_samples
    return sweep.num_samples * math.prod(len(parameter.values) for parameter in sweep.space.values())


def _concurrency(sweep) -> int:
    """``max_concurrent_trials``, lowered so that every running trial's Ray Train workers fit too: a trial
    holds its own CPUs while it waits for its workers', so too many at once wait on each other forever."""
    import ray

    per_trial = sweep.cpus_per_trial + sweep.num_workers * sweep.cpus_per_worker
    cpus = ray.cluster_resources().get("CPU", 0)
    fits = max(1, int(cpus / per_trial + 1e-9))
    if fits < sweep.max_concurrent_trials:
        logger.info(
            "[sweep] %d concurrent trials need %g CPUs, the cluster has %g: running %d at a time",
            sweep.max_concurrent_trials, sweep.max_concurrent_trials * per_trial, cpus, fits,
        )
    return min(fits, sweep.max_concurrent_trials)


def _rows(trials, stage_steps: int) -> list[dict]:
    """One row per trial from Tune's records: the swept values, how far it ran, its last metrics."""
    rows = []
    for trial in trials:
        metrics = trial.last_result or {}
        step = int(metrics.get("step", 0))
        if trial.status == "ERROR":
            status = "error"
        elif step >= stage_steps:
            status = "finished"
        else:
            status = f"stopped at step {step}"
        error = None
        if trial.status == "ERROR":
            error = (str(trial.get_error() or "error").strip().splitlines() or ["error"])[-1]
        rows.append({
            "trial_id": trial.trial_id,
            "status": status,
            "step": step,
            "params": dict(trial.config["params"]),
            "metrics": {key: value for key, value in metrics.items() if _reported(key) and isinstance(value, (int, float))},
            "error": error,
        })
    return sorted(rows, key=lambda row: row["trial_id"])


def _reported(key: str) -> bool:
    return key in known_metrics() or key in DOWNSTREAM_METRICS


# ---------------------------------------------------------------------- outputs


def best_trial(config: Config, rows: list[dict]) -> dict | None:
    """The best trial by ``select_by`` (the ASHA metric unless said otherwise), preferring trials that ran
    to the end (a stopped trial's last value comes from fewer steps)."""
    sweep = config.sweep
    select_by = sweep.select_by or sweep.metric
    mode = sweep.select_mode  # validated with the config: the metric's own direction unless set
    scored = [row for row in rows if row["status"] != "error" and _finite(row["metrics"].get(select_by))]
    if not scored:
        return None
    complete = [row for row in scored if row["status"] == "finished"] or scored
    pick = max if mode == "max" else min
    row = pick(complete, key=lambda row: row["metrics"][select_by])
    return {"trial_id": row["trial_id"], "select_by": select_by, "mode": mode, "value": row["metrics"][select_by],
            "params": row["params"], "step": row["step"]}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _collect(config: Config, sweep_dir: Path, rows: list[dict], skipped: bool = False) -> SweepResult:
    best = best_trial(config, rows)
    files = {
        "results": _write_tables(config, sweep_dir, rows, best),
        "plot": plot_metric_vs_params(config, sweep_dir / "metric_vs_params.png", rows, best),
        "tensorboard": sweep_dir / EXPERIMENT,
    }
    if best:
        files["best overrides"] = write_best_overrides(config, sweep_dir / BEST_OVERRIDES, best, sweep_dir)
    return SweepResult(sweep_dir, rows, best, files, skipped)


def _columns(config: Config, rows: list[dict]) -> tuple[list[str], list[str]]:
    params = list(config.sweep.space)
    wanted = [config.sweep.metric, *( [config.sweep.select_by] if config.sweep.select_by else []),
              "spoken/mask_fill_accuracy", "written/mask_fill_accuracy", "spoken/perplexity", *LOSS_TERMS[1:], *DOWNSTREAM_METRICS]
    metrics = []
    for name in wanted:
        if name not in metrics and any(name in row["metrics"] for row in rows):
            metrics.append(name)
    return params, metrics


def _write_tables(config: Config, sweep_dir: Path, rows: list[dict], best: dict | None) -> Path:
    params, metrics = _columns(config, rows)
    header = ["trial_id", "status", "step", *params, *metrics]
    table = [
        [row["trial_id"], row["status"], row["step"], *(row["params"].get(key) for key in params),
         *(row["metrics"].get(name) for name in metrics)]
        for row in rows
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(table)
    atomic_write_text(sweep_dir / "results.csv", buffer.getvalue())

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    sweep = config.sweep
    lines = [
        f"# Sweep of distill.{sweep.student} ({len(rows)} trials, {sweep.search} search, {sweep.scheduler} on {sweep.metric}, {sweep.mode})",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row, values in zip(rows, table):
        marker = " **best**" if best and row["trial_id"] == best["trial_id"] else ""
        lines.append("| " + " | ".join(cell(value) for value in values) + marker + " |")
    if best:
        lines += ["", f"Best: trial {best['trial_id']}, {best['select_by']} = {best['value']:.4f} ({best['mode']}); "
                  f"its values are in `{BEST_OVERRIDES}`."]
    errors = [row for row in rows if row["error"]]
    lines += [f"- {row['trial_id']}: {row['error']}" for row in errors]
    atomic_write_text(sweep_dir / "results.md", "\n".join(lines) + "\n")
    return sweep_dir / "results.md"


def plot_metric_vs_params(config: Config, path: Path, rows: list[dict], best: dict | None) -> Path:
    """One panel per swept value: the metric of every trial (filled: ran to the end; hollow: stopped early)."""
    from atm_ray.report import pyplot, save_figure

    plt = pyplot()
    sweep = config.sweep
    metric = sweep.select_by or sweep.metric
    keys = list(sweep.space)
    figure, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
    for axis, key in zip(axes[0], keys):
        for row in rows:
            value = row["metrics"].get(metric)
            if not _finite(value) or key not in row["params"]:
                continue
            finished = row["status"] == "finished"
            is_best = bool(best) and row["trial_id"] == best["trial_id"]
            axis.scatter(row["params"][key], value, s=60 if is_best else 30, marker="*" if is_best else "o",
                         facecolors="C3" if is_best else ("C0" if finished else "none"), edgecolors="C3" if is_best else "C0")
        if sweep.space[key].log:
            axis.set_xscale("log")
        axis.set_xlabel(key)
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
    figure.suptitle(f"distill.{sweep.student}: {metric} per trial (hollow: stopped early by ASHA; star: best)", fontsize=9)
    figure.tight_layout()
    return save_figure(figure, path)


def write_best_overrides(config: Config, path: Path, best: dict, sweep_dir: Path) -> Path:
    """The best trial's values as an override file for ``atm-ray distill`` and ``atm-ray pipeline``."""
    student = config.sweep.student
    tree: dict = {}
    for key, value in best["params"].items():
        apply_override(tree, ["distill", student, *key.split(".")], value)
    header = (
        f"# best trial {best['trial_id']} of the sweep in {sweep_dir}: {best['select_by']} = {best['value']:.4f}\n"
        f"# use: atm-ray distill --student {student} --preset {config.name} --overrides-file {path}\n"
        f"#      atm-ray pipeline --preset {config.name} --overrides-file {path}\n"
    )
    atomic_write_text(path, header + yaml.safe_dump(tree, sort_keys=True))
    return path
