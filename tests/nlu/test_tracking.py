"""Tracking of a training stage: TensorBoard events under the stage folder, and a local file-based MLflow
store holding the stage's parameters, metrics at each epoch and its export."""

import json

import pytest
from conftest import tensorboard_scalars

from atm_ray.config import AtmRayError, load_config
from atm_ray.nlu.finetune import run_finetune

SNIPS = "bundled:nlu/snips"


def _config(run_dir, *overrides):
    return load_config("tiny", [
        f"run_dir={run_dir}",
        f"finetune.train=[{{format: jointbert, path: '{SNIPS}/train', max_records: 400}}]",
        f"finetune.dev=[{{format: jointbert, path: '{SNIPS}/dev', max_records: 100}}]",
        f"finetune.test=[{{format: jointbert, path: '{SNIPS}/test', max_records: 100}}]",
        "finetune.max_epochs=2", "finetune.patience=5", *overrides,
    ])


def test_fine_tuning_is_tracked_in_tensorboard_and_a_file_mlflow_store(encoder_dir, tmp_path):
    mlflow = pytest.importorskip("mlflow")  # in the test extra: present wherever the README's tests run
    store = f"file://{tmp_path / 'mlruns'}"
    config = _config(tmp_path / "run", f"tracking.mlflow_uri={store}", "tracking.mlflow_experiment=tracking-test")
    manifest = run_finetune(config, encoder_dir, name="tracked", use_ray=False)
    stage_dir = tmp_path / "run" / "tracked"
    history = json.loads((stage_dir / "metrics.json").read_text())

    scalars = tensorboard_scalars(stage_dir / "tensorboard")
    assert [step for step, _ in scalars["dev/exact_match"]] == [1, 2]
    assert [value for _, value in scalars["train_loss"]] == pytest.approx([entry["train_loss"] for entry in history])

    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name("tracking-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == manifest["outputs"]["mlflow_run"] and run.info.status == "FINISHED"
    assert run.data.tags["atm_ray.stage"] == "tracked"
    assert run.data.params["settings.learning_rate"] == str(config.finetune.learning_rate)
    assert run.data.params["config_hash"] == manifest["config_hash"]
    dev = client.get_metric_history(run.info.run_id, "dev/exact_match")
    assert [(point.step, point.value) for point in dev] == [(entry["epoch"], entry["dev/exact_match"]) for entry in history]
    assert run.data.metrics["test/exact_match"] == pytest.approx(manifest["metrics"]["test/exact_match"])
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id, "export")}
    assert {"export/config.json", "export/model.safetensors", "export/README.md"} <= artifacts


def test_tensorboard_off_and_a_missing_mlflow_are_settings(encoder_dir, tmp_path, monkeypatch):
    config = _config(tmp_path / "run", "tracking.tensorboard=false", "finetune.max_epochs=1")
    run_finetune(config, encoder_dir, name="quiet", use_ray=False)
    assert not (tmp_path / "run" / "quiet" / "tensorboard").exists()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "mlflow" else real(name, *rest))
    config = _config(tmp_path / "run2", "tracking.mlflow_uri=file:///nowhere", "finetune.max_epochs=1")
    with pytest.raises(AtmRayError, match=r"pip install 'atm-ray\[mlflow\]'"):
        run_finetune(config, encoder_dir, name="untracked", use_ray=False)
    assert not (tmp_path / "run2" / "untracked").exists()  # refused before any work
