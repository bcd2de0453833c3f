"""What a person at the console sees: a short Ray stage names its log file, repeats no warning, and
Ctrl-C ends it with the command that resumes it; run again, it resumes."""

import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from conftest import clean_environment

pytestmark = pytest.mark.slow

STAGE = ["pretrain.stage1.steps=60", "pretrain.stage1.eval_every=20", "pretrain.stage1.checkpoint_every=20",
         "pretrain.stage1.engine.micro_batch_size=8"]


def _command(run_dir):
    return [sys.executable, "-m", "atm_ray.cli", "pretrain", "--stage", "1", "--preset", "tiny", "--run-dir", str(run_dir), *STAGE]


def test_ctrl_c_prints_the_resume_command_and_the_console_stays_quiet(tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(_command(run_dir), env=clean_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        # past the first checkpoint as Ray Train records it (the snapshot a rerun resumes from): a worker's
        # progress alone can run ahead of it on a loaded machine, and a rerun then starts from step 0
        try:
            if any(json.loads(snapshot.read_text()).get("checkpoint_results")
                   for snapshot in (run_dir / "teacher_stage1" / "ray").glob("*/checkpoint_manager_snapshot.json")):
                break
        except (OSError, ValueError):  # being written
            pass
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()[1][-3000:]
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr and " ".join(_command(run_dir)[3:]) in stderr  # the command to run again

    resumed = subprocess.run(_command(run_dir), env=clean_environment(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    log_file = run_dir / "logs" / "teacher_stage1.log"
    assert f"its workers' logs: {log_file}" in output and log_file.stat().st_size > 0
    # SIGINT came after the step-20 checkpoint; on a loaded machine the workers may also save step 40
    # before they stop. Either way the run resumes from a checkpoint, never from the start.
    resumed_from = re.search(r"\[teacher_stage1\] resumed from the checkpoint of step (\d+)", output)
    assert resumed_from and int(resumed_from[1]) in (20, 40), output
    assert "teacher_stage1 finished (step 60)" in output
    # the workers' DeepSpeed and Ray lines are in the log file, not here; nothing repeats
    assert "Checkpoint successfully created" not in output and "Checkpoint successfully created" in log_file.read_text()
    assert "Failed to query Ray Train Controller" not in output
    assert "Token authentication" not in output  # Ray's note that a new local cluster has it
    repeated = {line: count for line, count in Counter(line for line in output.splitlines() if line.strip()).items() if count > 1}
    assert not repeated, repeated
    assert len(output.splitlines()) < 30, output


def test_a_run_without_ray_draws_a_progress_bar_on_a_terminal(tmp_path):
    """--no-ray (the engine loop in this process) on a terminal: tqdm's bar for the stage, the evaluation
    lines above it; without a terminal (every other test) no bar."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 columns wide
    process = subprocess.Popen([*_command(tmp_path / "run")[:-len(STAGE)], "--no-ray", *STAGE, "pretrain.stage1.steps=20"],
                               env=clean_environment(), stdout=secondary, stderr=secondary, close_fds=True)
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert process.wait(timeout=600) == 0, b"".join(chunks)[-3000:]
    os.close(primary)
    shown = b"".join(chunks).decode("utf-8", "replace")
    assert "teacher_stage1:" in shown and "/20 [" in shown, shown[-3000:]  # tqdm's "teacher_stage1: 50%|… 10/20 [00:05<…"
    assert "[teacher_stage1] step 20: train_loss" in shown
