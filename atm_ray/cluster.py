"""Joining or starting the Ray cluster every Ray-backed command runs on."""

from __future__ import annotations

import logging
import os
import socket

from atm_ray.utils import VERBOSE_ENV

# Ray's state API finds the dashboard from this variable before it looks for a running Ray
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _no_token_auth_note(record: logging.LogRecord) -> bool:
    """Ray gives a new local cluster token authentication unless told otherwise and warns on the console
    that it did, at every start: not a problem to the user. The warning it gives when authentication is
    off still shows."""
    return not record.getMessage().startswith("Token authentication is enabled")


def init_ray(address: str | None = None, dashboard: bool = True) -> None:
    """Join ``address`` (or the cluster of a submitted job), else start a local Ray for this program,
    with its dashboard on 127.0.0.1: Ray's state API lives there, and Ray Train V2's placement-group
    cleaner polls it after every run (without it, each stage leaves a cleaner that warns forever that the
    state API is unavailable, and cannot free a dead run's workers; Tune needs it for trials ASHA stops).

    The local Ray's workers are told its dashboard's address: left to find it, the state API refuses to
    pick when another local Ray runs on the machine ("Found multiple active Ray instances"), and a sweep
    whose trials ASHA stops hangs, their workers never freed. Only the workers are told (every state API
    call is in Train's actors): in this process's environment the address would outlive this Ray and
    reach the commands it starts."""
    import ray
    import torch

    environment = {
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray Train V2 waits for the controller's poll on every report; poll often.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
        "TOKENIZERS_PARALLELISM": "false",
        # models are built from config and loaded from local folders, never fetched from a hub
        "HF_HUB_OFFLINE": "1",
    }
    if not torch.cuda.is_available():
        environment["DS_ACCELERATOR"] = "cpu"
    # What the user or a submitted job's runtime env already sets wins; Ray refuses to merge a
    # variable that both the job and ray.init set.
    runtime_env = {"env_vars": {name: value for name, value in environment.items() if name not in os.environ}}
    for name, value in environment.items():
        os.environ.setdefault(name, value)
    if ray.is_initialized():
        return
    # the workers' own output goes to <run>/logs/<stage>.log; with -v it comes to this console too
    log_to_driver = os.environ.get(VERBOSE_ENV) == "1"
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING, log_to_driver=log_to_driver)
    else:
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_no_token_auth_note)
        port = None
        if dashboard and API_SERVER_ENV not in os.environ:
            port = _free_port()
            runtime_env["env_vars"][API_SERVER_ENV] = f"http://127.0.0.1:{port}"
        # The raylet prints a warning to the console once 4x its startup concurrency (default: one per
        # CPU) of worker processes are alive; each Ray Train run keeps ~5 (controller, workers, helpers),
        # so two runs side by side (the pipeline's fine-tunings) pass it on a 2-core machine by design.
        ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1", dashboard_port=port,
                 runtime_env=runtime_env, logging_level=logging.WARNING, log_to_driver=log_to_driver,
                 _system_config={"worker_maximum_startup_concurrency": max(4, os.cpu_count() or 1)})
