"""Ray Tune sweeps of the final distillation on a real local Ray (with its dashboard: Ray Train needs the
state API to release a stopped trial's workers), each trial its own Ray Train run of the real engine."""

import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import SHORT_STAGES, clean_environment

from atm_ray.config import ConfigError, load_config
from atm_ray.train.stages import run_distill, run_pretrain_stage
from atm_ray.train.sweep import EXPERIMENT, check_sweep



@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A run folder whose teachers and intermediate student have finished (short, in this process)."""
    run_dir = tmp_path_factory.mktemp("sweep-run")
    config = load_config("tiny", [f"run_dir={run_dir}", *SHORT_STAGES])
    for stage in (1, 2):
        run_pretrain_stage(config, stage, use_ray=False)
    run_distill(config, "intermediate", use_ray=False)
    return run_dir


def _sweep_command(run_dir, name, *overrides):
    return [sys.executable, "-m", "atm_ray.cli", "sweep", "--preset", "tiny", "--student", "final",
            "--run-dir", str(run_dir), "--name", name, *SHORT_STAGES, *overrides]


def _environment():
    return clean_environment()


def _results(sweep_dir):
    with open(sweep_dir / "results.csv") as handle:
        return list(csv.DictReader(handle))


def test_sweep_settings_are_checked_before_any_trial():
    config = load_config("tiny", ["sweep.space={weights.sof_ce: {values: [1.0]}}"])
    with pytest.raises(ConfigError, match="sweep.space.weights.sof_ce"):
        check_sweep(config)
    with pytest.raises(ConfigError, match="sweep.metric"):
        check_sweep(load_config("tiny", ["sweep.metric=spoken/accuracy"]))
    with pytest.raises(ConfigError, match="grid search needs a list of values"):
        load_config("tiny", ["sweep.search=grid"])  # the preset's space has ranges


@pytest.mark.slow
def test_four_trial_sweep_with_asha_writes_results_and_best_overrides(upstream):
    # two trials with a useful learning rate, then two with a useless one: when the later ones reach
    # the first rung, ASHA has the earlier ones' losses there and stops at least one of them
    overrides = [
        "sweep.search=grid", "sweep.num_samples=1", "sweep.scheduler=asha",
        "sweep.space={engine.learning_rate: {values: [3.0e-3, 3.0e-3, 1.0e-7, 1.0e-7]}}",
        "sweep.steps=20", "sweep.eval_every=5", "sweep.grace_period=5", "sweep.metric=spoken/mlm_loss", "sweep.mode=min",
    ]
    finished = subprocess.run(_sweep_command(upstream, "sweep_asha", *overrides), env=_environment(),
                              capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    sweep_dir = upstream / "sweep_asha"
    rows = _results(sweep_dir)
    assert len(rows) == 4
    statuses = [row["status"] for row in rows]
    assert "error" not in statuses, (sweep_dir / "results.md").read_text()
    assert any(status.startswith("stopped at step") for status in statuses), statuses
    assert any(status == "finished" for status in statuses), statuses
    assert all(float(row["spoken/mlm_loss"]) > 0 for row in rows)
    assert (sweep_dir / "metric_vs_params.png").stat().st_size > 5_000
    assert list((sweep_dir / "tune").glob("*/events.out.tfevents.*")), "no TensorBoard logs"
    assert "**best**" in (sweep_dir / "results.md").read_text()
    # each trial ran the stage through its own Ray Train run, and exported what it trained
    trial_dirs = [path for path in (sweep_dir / "trials").iterdir() if path.name != "logs"]
    assert len(trial_dirs) == 4 and all((trial / "ray").is_dir() for trial in trial_dirs)
    # each trial's workers wrote their own output to trials/logs/<trial>.log, not to the sweep's console
    assert sorted(path.stem for path in (sweep_dir / "trials" / "logs").glob("*.log")) == sorted(path.name for path in trial_dirs)

    best_file = sweep_dir / "best_overrides.yaml"
    best = yaml.safe_load(best_file.read_text())
    state = json.loads((sweep_dir / "sweep.json").read_text())
    assert state["finished"] and best == {"distill": {"final": {"engine": {"learning_rate": state["best"]["params"]["engine.learning_rate"]}}}}
    config = load_config("tiny", [], [str(best_file)])  # what `atm-ray distill/pipeline --overrides-file` loads
    assert config.distill.final.engine.learning_rate == state["best"]["params"]["engine.learning_rate"]

    # a rerun of the finished sweep only rebuilds the outputs
    again = subprocess.run(_sweep_command(upstream, "sweep_asha", *overrides), env=_environment(),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "sweep up to date" in again.stdout, again.stderr[-3000:]
    # other settings in the same folder are refused
    other = subprocess.run(_sweep_command(upstream, "sweep_asha", *overrides[:-1], "sweep.mode=max"),
                           env=_environment(), capture_output=True, text=True, timeout=600)
    assert other.returncode == 2 and "holds a sweep with other settings" in other.stderr


@pytest.mark.slow
def test_interrupted_sweep_resumes_only_the_unfinished_trials(upstream):
    overrides = ["sweep.num_samples=2", "sweep.max_concurrent_trials=1", "sweep.scheduler=fifo",
                 "sweep.steps=6", "sweep.eval_every=3"]
    command = _sweep_command(upstream, "sweep_interrupted", *overrides)
    sweep_dir = upstream / "sweep_interrupted"
    process = subprocess.Popen(command, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # one trial at a time: the second one starts only once Tune has recorded the end of the first
    starts_file = sweep_dir / "trial_starts.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        if starts_file.is_file() and len(starts_file.read_text().splitlines()) >= 2:
            break
        time.sleep(0.5)
    assert process.poll() is None and len(starts_file.read_text().splitlines()) >= 2, "the sweep did not end a trial in time"
    process.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment and stops
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 3, stdout[-2000:] + stderr[-3000:]
    assert "interrupted" in stderr
    starts_before = len(starts_file.read_text().splitlines())
    # what Tune recorded as ended; a trial that wrote its export but had not yet reported its end starts
    # again on restore and finds its stage up to date (its export is not rewritten)
    from ray import tune

    ended_before = {trial.trial_id for trial in tune.ExperimentAnalysis(str(sweep_dir / EXPERIMENT)).trials
                    if trial.status == "TERMINATED"}
    assert len(ended_before) == 1, ended_before
    exports_before = {path.parent.name: path.stat().st_mtime_ns for path in (sweep_dir / "trials").glob("*/manifest.json")}
    assert ended_before <= set(exports_before)

    resumed = subprocess.run(command, env=_environment(), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming the interrupted sweep" in resumed.stdout
    starts = [json.loads(line) for line in starts_file.read_text().splitlines()]
    restarted = {start["trial_id"] for start in starts[starts_before:]}
    assert restarted and not restarted & ended_before, (restarted, ended_before)
    for trial_id, mtime in exports_before.items():
        assert (sweep_dir / "trials" / trial_id / "manifest.json").stat().st_mtime_ns == mtime, f"{trial_id} trained again"
    assert len({start["trial_id"] for start in starts}) == 2
    rows = _results(sweep_dir)
    assert len(rows) == 2 and all(row["status"] == "finished" for row in rows), rows


def test_best_trial_prefers_trials_that_ran_to_the_end():
    from atm_ray.train.sweep import best_trial, expected_trials

    config = load_config("tiny", ["sweep.metric=spoken/mask_fill_accuracy", "sweep.mode=max"])
    rows = [
        {"trial_id": "a", "status": "finished", "step": 60, "params": {"temperature": 1.0}, "metrics": {"spoken/mask_fill_accuracy": 0.2}},
        {"trial_id": "b", "status": "stopped at step 15", "step": 15, "params": {"temperature": 2.0}, "metrics": {"spoken/mask_fill_accuracy": 0.3}},
        {"trial_id": "c", "status": "error", "step": 0, "params": {"temperature": 4.0}, "metrics": {}},
        {"trial_id": "d", "status": "finished", "step": 60, "params": {"temperature": 4.0}, "metrics": {"spoken/mask_fill_accuracy": 0.25}},
    ]
    assert best_trial(config, rows)["trial_id"] == "d"
    assert best_trial(load_config("tiny", ["sweep.mode=min"]), rows)["trial_id"] == "a"
    assert expected_trials(config.sweep) == 4
    grid = load_config("tiny", ["sweep.search=grid", "sweep.num_samples=2",
                                "sweep.space={temperature: {values: [1, 2, 4]}, weights.mlm: {values: [0.5, 1]}}"])
    assert expected_trials(grid.sweep) == 12


@pytest.mark.slow
def test_better_is_the_metrics_own_direction_unless_said():
    """Selecting by a perplexity picks the lowest one (a guess from the ASHA metric's mode picked the worst);
    an unknown select_by is refused when the config loads."""
    from atm_ray.train.sweep import best_trial

    rows = [
        {"trial_id": "a", "status": "finished", "step": 60, "params": {}, "metrics": {"spoken/perplexity": 40.0}},
        {"trial_id": "b", "status": "finished", "step": 60, "params": {}, "metrics": {"spoken/perplexity": 90.0}},
    ]
    config = load_config("tiny", ["sweep.select_by=spoken/perplexity"])
    assert config.sweep.mode == "max" and config.sweep.select_mode == "min"
    assert best_trial(config, rows)["trial_id"] == "a"
    assert best_trial(load_config("tiny", ["sweep.select_by=spoken/perplexity", "sweep.select_mode=max"]), rows)["trial_id"] == "b"
    assert load_config("tiny", ["sweep.metric=spoken/perplexity"]).sweep.mode == "min"
    with pytest.raises(ConfigError, match="select_by"):
        load_config("tiny", ["sweep.select_by=spoken/perplexty"])


@pytest.mark.slow
def test_downstream_scores_come_from_a_short_fine_tune(upstream, tmp_path):
    from atm_ray.train.sweep import downstream_scores

    config = load_config("tiny", ["sweep.downstream={epochs: 1, max_train_records: 300}", "sweep.select_by=downstream/exact_match"])
    scores = downstream_scores(config, upstream / "intermediate_continue" / "export", tmp_path)
    assert set(scores) == {"downstream/intent_accuracy", "downstream/slot_f1", "downstream/exact_match"}
    assert 0 < scores["downstream/intent_accuracy"] <= 1 and 0 <= scores["downstream/exact_match"] <= 1
    manifest = json.loads((tmp_path / "downstream" / "manifest.json").read_text())
    assert manifest["inputs"]["train_records"] == 300 and manifest["metrics"]["epochs"] == 1
