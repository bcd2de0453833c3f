"""`ray job submit` against a real local head: the job entry points work as their runbooks say; the
tiny pipeline end to end as a submitted job, then rerun by the CLI to check stage-level resume."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SHORT_STAGES, free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    temp_dir = tmp_path_factory.mktemp("ray-head")
    port, dashboard_port = free_port(), free_port()
    # every port of its own, so that another Ray on this machine (a developer's, a test's) cannot collide
    own_ports = [
        "--dashboard-agent-listen-port", str(free_port()),
        "--dashboard-agent-grpc-port", str(free_port()),
        "--metrics-export-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()),
        "--ray-client-server-port", str(free_port()),
        "--node-manager-port", str(free_port()),
        "--object-manager-port", str(free_port()),
    ]
    environment = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
    ray = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port), "--num-cpus", "2",
         "--temp-dir", str(temp_dir), "--include-dashboard", "true", *own_ports],
        env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + 90
    client = None
    while time.time() < deadline:
        try:
            client = JobSubmissionClient(address)
            break
        except Exception:  # the dashboard is still starting
            time.sleep(1)
    if client is None:
        head.kill()
        pytest.fail("the local Ray head's dashboard did not come up in 90 s")
    yield client
    os.killpg(head.pid, signal.SIGTERM)
    head.wait(timeout=60)


def _submit_and_wait(client, entrypoint: str, timeout: float = 600) -> str:
    """Submit ``entrypoint`` with this checkout as the working dir; wait for success; return the logs."""
    from ray.job_submission import JobStatus

    submission = dict(
        entrypoint=entrypoint,
        runtime_env={"working_dir": str(REPO), "env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}},
    )
    for _ in range(60):  # the head's job agent comes up a little after its dashboard
        try:
            job = client.submit_job(**submission)
            break
        except RuntimeError as error:
            if "No available agent" not in str(error):
                raise
            time.sleep(2)
    else:
        pytest.fail("the local head never accepted the job")
    deadline = time.time() + timeout
    status = client.get_job_status(job)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.time() < deadline:
        time.sleep(2)
        status = client.get_job_status(job)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    return logs


# ---------------------------------------------------------------------- the whole pipeline

# the tiny preset with every stage cut short: one worker, a slice of SNIPS, one or two epochs
PIPELINE = [
    *SHORT_STAGES, "cluster.num_workers=1",
    "finetune.train.0.max_records=400", "finetune.dev.0.max_records=100", "finetune.test.0.max_records=100",
    "finetune.max_epochs=2",
]
PIPELINE_ARGS = " ".join(shlex.quote(override) for override in PIPELINE)
STAGES = ["prepare", "teacher_stage1", "teacher_stage2", "intermediate_distill", "intermediate_continue",
          "final_distill", "finetune_scratch", "finetune_student"]


@pytest.fixture(scope="module")
def pipeline_run(ray_head, tmp_path_factory):
    """The tiny pipeline submitted to the local head with `ray job submit`'s client; its run folder."""
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    logs = _submit_and_wait(ray_head, f"python jobs/pipeline.py --preset tiny --run-dir {run_dir} {PIPELINE_ARGS}", 1200)
    return run_dir, logs


def test_stage_job_finds_the_pipelines_stage_up_to_date(ray_head, pipeline_run):
    # a stage's own entry point with the pipeline's settings recognises the stage the pipeline trained
    run_dir = pipeline_run[0]
    manifest = run_dir / "teacher_stage1" / "manifest.json"
    written = manifest.stat().st_mtime_ns
    logs = _submit_and_wait(
        ray_head, f"python jobs/pretrain_teacher.py --stage 1 --preset tiny --run-dir {run_dir} {PIPELINE_ARGS}"
    )
    assert "teacher_stage1 up to date" in logs, logs[-3000:]
    assert manifest.stat().st_mtime_ns == written


def _manifests(run_dir: Path) -> dict[str, tuple[str, float]]:
    return {stage: (json.loads((run_dir / stage / "manifest.json").read_text())["config_hash"],
                    (run_dir / stage / "manifest.json").stat().st_mtime) for stage in STAGES}


def _pipeline(run_dir: Path, *overrides: str, **popen) -> subprocess.Popen:
    """`atm-ray pipeline` in its own process (its own local Ray), in a new session so it can be killed whole."""
    command = [sys.executable, "-m", "atm_ray.cli", "pipeline", "--preset", "tiny", "--run-dir", str(run_dir), *PIPELINE, *overrides]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **popen)


def test_pipeline_job_runs_every_stage_and_writes_the_report(pipeline_run):
    run_dir, logs = pipeline_run
    for number in range(1, 11):  # prepare, 5 masked-LM stages, 2 fine-tunings, evaluation, report
        assert f"[pipeline] {number}/10" in logs
    for stage in STAGES:
        assert (run_dir / stage / "manifest.json").is_file(), stage
    assert (run_dir / "final_distill" / "export" / "model.safetensors").is_file()
    assert "relative error" in (run_dir / "evaluation" / "comparison.md").read_text().lower()
    report = (run_dir / "report.md").read_text()
    for section in ("## Stages", "## Parameter counts", "## Teacher switch", "## Mask filling", "## NLU comparison"):
        assert section in report
    assert "switched from the Stage-1 to the Stage-2 teacher at step 6" in report
    # the two fine-tunings ran side by side (on this 2-CPU head, one CPU each): each started before the
    # other one's manifest was written
    started = {stage: json.loads((run_dir / stage / "progress.json").read_text())["started"] for stage in STAGES[-2:]}
    ended = {stage: (run_dir / stage / "manifest.json").stat().st_mtime for stage in STAGES[-2:]}
    assert started["finetune_scratch"] < ended["finetune_student"] and started["finetune_student"] < ended["finetune_scratch"], (started, ended)
    assert "finetune_scratch: export in" in logs and "finetune_student: export in" in logs
    for figure in ("loss_perplexity.png", "mask_filling.png", "finetuning.png"):
        assert f"report/{figure}" in report and (run_dir / "report" / figure).stat().st_size > 5_000
    # `atm-ray report` rebuilds it
    os.remove(run_dir / "report.md")
    rebuilt = subprocess.run([sys.executable, "-m", "atm_ray.cli", "report", str(run_dir)], capture_output=True, text=True)
    assert rebuilt.returncode == 0 and (run_dir / "report.md").read_text().count("## ") == report.count("## ")


def test_changed_stage_reruns_and_resumes_after_a_kill(pipeline_run, tmp_path):
    """Change final_distill's config: only it and the stages after it rerun; kill the pipeline during that
    stage (after a checkpoint), rerun: the earlier stages are skipped and the stage resumes."""
    run_dir = tmp_path / "run"
    shutil.copytree(pipeline_run[0], run_dir, symlinks=True)
    before = _manifests(run_dir)
    longer = ["distill.final.steps=30", "distill.final.eval_every=5", "distill.final.checkpoint_every=5",
              "distill.final.temperature=2.0"]
    started = time.time()
    process = _pipeline(run_dir, *longer)
    deadline = started + 600
    while time.time() < deadline and process.poll() is None:
        # a checkpoint of the new run (the earlier run's folder is there too, under its own config hash)
        if any(path.stat().st_mtime > started for path in (run_dir / "final_distill" / "ray").glob("*/checkpoint_*")):
            break
        time.sleep(0.5)
    assert process.poll() is None, "the pipeline ended before final_distill wrote a checkpoint"
    time.sleep(1.0)  # past Ray Train's report poll, so the checkpoint is registered
    os.killpg(process.pid, signal.SIGKILL)  # the driver and the local Ray it started
    process.wait(timeout=60)
    assert json.loads((run_dir / "final_distill" / "manifest.json").read_text())["config_hash"] == before["final_distill"][0]

    rerun = _pipeline(run_dir, *longer)
    output, _ = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, output[-4000:]
    after = _manifests(run_dir)
    # the scratch baseline takes only the final student's architecture: it does not rerun either
    for stage in ("prepare", "teacher_stage1", "teacher_stage2", "intermediate_distill", "intermediate_continue", "finetune_scratch"):
        assert after[stage] == before[stage], f"{stage} reran"
    assert "intermediate_continue up to date" in output and "final_distill finished" in output
    history = json.loads((run_dir / "final_distill" / "metrics.json").read_text())
    assert [entry["step"] for entry in history] == [5, 10, 15, 20, 25, 30]
    assert history[0]["resumed_from_step"] == 0 and history[-1]["resumed_from_step"] >= 5, history
    assert "[final_distill] resumed from the checkpoint of step" in output
    for stage in ("final_distill", "finetune_student"):
        assert after[stage][0] != before[stage][0], f"{stage} did not rerun"


def test_ctrl_c_stops_the_side_by_side_fine_tunings_and_a_rerun_resumes_each(pipeline_run, tmp_path):
    """The pipeline's two fine-tunings run in threads, where Ray Train's own Ctrl-C handler cannot be:
    Ctrl-C still ends the pipeline with the command that resumes it, and that command resumes each one."""
    run_dir = tmp_path / "run"
    shutil.copytree(pipeline_run[0], run_dir, symlinks=True)
    for stage in ("finetune_scratch", "finetune_student", "evaluation"):
        shutil.rmtree(run_dir / stage)
    longer = ["finetune.max_epochs=15", "finetune.patience=15"]  # 2-3 s an epoch here: time to interrupt
    process = _pipeline(run_dir, *longer)
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        if all(any((run_dir / stage / "ray").glob("*/checkpoint_*")) for stage in STAGES[-2:]):
            break
        time.sleep(0.5)
    assert process.poll() is None, "the pipeline ended before both fine-tunings wrote a checkpoint"
    time.sleep(1.0)  # past Ray Train's report poll, so the checkpoints are registered
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=180)
    assert process.returncode == 130, output[-4000:]
    assert "interrupted" in output and f"pipeline --preset tiny --run-dir {run_dir}" in output, output[-4000:]
    assert not any((run_dir / stage / "manifest.json").exists() for stage in STAGES[-2:])

    rerun = _pipeline(run_dir, *longer)
    output, _ = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, output[-4000:]
    for stage in STAGES[-2:]:
        assert f"[{stage}] resumed from the checkpoint of epoch" in output, output[-4000:]
        assert json.loads((run_dir / stage / "manifest.json").read_text())["metrics"]["best_epoch"] >= 1
