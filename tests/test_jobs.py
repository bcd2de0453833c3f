"""`ray job submit` against a real local head: the job entry points work as their runbooks say."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    temp_dir = tmp_path_factory.mktemp("ray-head")
    port, dashboard_port = _free_port(), _free_port()
    # every port of its own, so that another Ray on this machine (a developer's, a test's) cannot collide
    own_ports = [
        "--dashboard-agent-listen-port", str(_free_port()),
        "--dashboard-agent-grpc-port", str(_free_port()),
        "--metrics-export-port", str(_free_port()),
        "--runtime-env-agent-port", str(_free_port()),
        "--ray-client-server-port", str(_free_port()),
        "--node-manager-port", str(_free_port()),
        "--object-manager-port", str(_free_port()),
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


def test_pretrain_job_submitted_to_a_local_head(ray_head, tmp_path):
    from ray.job_submission import JobStatus

    run_dir = tmp_path / "run"
    submission = dict(
        entrypoint=(
            f"python jobs/pretrain_teacher.py --stage 1 --preset tiny --run-dir {run_dir} "
            "pretrain.stage1.steps=6 pretrain.stage1.eval_every=3 pretrain.stage1.checkpoint_every=3"
        ),
        runtime_env={"working_dir": str(REPO), "env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}},
    )
    for _ in range(60):  # the head's job agent comes up a little after its dashboard
        try:
            job = ray_head.submit_job(**submission)
            break
        except RuntimeError as error:
            if "No available agent" not in str(error):
                raise
            time.sleep(2)
    else:
        pytest.fail("the local head never accepted the job")
    deadline = time.time() + 600
    status = ray_head.get_job_status(job)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.time() < deadline:
        time.sleep(2)
        status = ray_head.get_job_status(job)
    logs = ray_head.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "teacher_stage1 finished" in logs
    assert (run_dir / "teacher_stage1" / "export" / "model.safetensors").is_file()
