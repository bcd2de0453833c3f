"""cluster.yaml is a valid Ray cluster launcher config (Ray's own schema, after the defaults `ray up` fills in);
the local Ray atm-ray starts keeps to itself beside another one."""

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import fillout_defaults, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_passes_ray_validation():
    config = yaml.safe_load(CLUSTER.read_text())
    validate_config(fillout_defaults(config))
    node_types = config["available_node_types"]
    assert node_types[config["head_node_type"]]["resources"] == {"CPU": 0}  # nothing trains on the head
    assert any("p5" in node["node_config"]["InstanceType"] for node in node_types.values())  # GPU workers
    assert any("pip install -e" in command for command in config["setup_commands"])  # installs the package
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):  # Serve's high-throughput mode on every node
        (start,) = [command for command in config[key] if "ray start" in command]
        assert "RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1 ray start" in start


def test_a_broken_cluster_yaml_is_refused():
    import jsonschema

    config = yaml.safe_load(CLUSTER.read_text())
    config["available_node_types"]["gpu_8x"]["max_workers"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(fillout_defaults(config))


KUBERAY = Path(__file__).resolve().parents[1] / "kuberay"
RAY_DASHBOARD = False  # the local_ray below needs no state API


def test_kuberay_rayjob_runs_a_job_entry_point_that_parses():
    import shlex

    import ray

    from atm_ray.cli import build_parser

    job = yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (gpu_group,) = cluster["workerGroupSpecs"]
    limits = gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "8"
    # the entry point is one of jobs/*.py and its arguments are what the CLI accepts
    program, script, *arguments = shlex.split(job["spec"]["entrypoint"])
    assert program == "python" and script.startswith("/home/ray/atm-ray/jobs/")
    job_file = Path(__file__).resolve().parents[1] / script.removeprefix("/home/ray/atm-ray/")
    assert job_file.is_file()
    command = {"pipeline.py": "pipeline", "sweep.py": "sweep", "distill.py": "distill"}[job_file.name]
    parsed = build_parser().parse_args([command, *arguments])
    assert parsed.preset == "paper" and parsed.overrides == ["cluster.storage_path=s3://atm-ray-runs/paper"]


def test_kuberay_rayservice_serve_config_passes_ray_validation(tmp_path):
    import importlib

    from ray.serve.schema import ServeDeploySchema

    from atm_ray.serve.app import ServeSettings, Traffic, build_app

    service = yaml.safe_load((KUBERAY / "rayservice.yaml").read_text())
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    schema = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (application,) = schema.applications
    module_name, _, attribute = application.import_path.partition(":")
    assert getattr(importlib.import_module(module_name), attribute) is build_app
    args = dict(application.args)
    assert all(arm["model_dir"].startswith("/mnt/runs/") for arm in args["arms"])  # the run volume
    for arm in args["arms"]:  # stand-ins for the exports on the volume (only their config.json is checked here)
        arm["model_dir"] = str(tmp_path / arm["name"])
        (tmp_path / arm["name"]).mkdir()
        (tmp_path / arm["name"] / "config.json").write_text("{}")
    settings = ServeSettings(**args)
    assert [arm.name for arm in settings.arms] == ["A", "B"] and settings.quantize == "int8"
    (deployment,) = application.deployments
    assert set(Traffic.model_validate(deployment.user_config).weights) == {"A", "B"}
    # every node starts Ray in Serve's high-throughput mode (HAProxy ingress)
    spec = service["spec"]["rayClusterConfig"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        (container,) = group["template"]["spec"]["containers"]
        assert {item["name"]: item["value"] for item in container["env"]} == {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


STATE_API_FROM_A_WORKER = """
import ray
from atm_ray.cluster import init_ray

@ray.remote(num_cpus=0)
def state_api_nodes():  # what Ray Train's placement-group cleaner does in its actor
    from ray.util.state import list_nodes
    return [node.node_id for node in list_nodes()]

for _ in range(2):  # a process that shuts its Ray down and starts another finds the new one
    init_ray()
    assert ray.get(state_api_nodes.remote()) == [ray.get_runtime_context().get_node_id()]
    ray.shutdown()
print("state API ok")
"""


@pytest.mark.slow
def test_workers_reach_their_own_state_api_while_another_local_ray_runs():
    """A sweep beside a running pipeline: with two local Rays on the machine, Ray's state API refuses to
    pick one ("Found multiple active Ray instances") unless told; Train's cleaner then never frees the
    workers of a trial ASHA stops, and the sweep hangs."""
    import subprocess
    import sys

    from conftest import clean_environment

    other = subprocess.Popen(
        [sys.executable, "-c", "import ray, sys; ray.init(address='local', include_dashboard=False); "
         "print('up', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=clean_environment(),
    )
    try:
        assert other.stdout.readline().strip() == "up"
        done = subprocess.run([sys.executable, "-c", STATE_API_FROM_A_WORKER], env=clean_environment(),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "state API ok" in done.stdout, done.stderr[-3000:]
    finally:
        other.stdin.close()
        other.wait(timeout=60)


@pytest.mark.slow
def test_side_by_side_fine_tunings_halve_what_the_cluster_cannot_hold_twice(local_ray):
    from atm_ray.config import load_config
    from atm_ray.pipeline import side_by_side

    cpus = local_ray.cluster_resources()["CPU"]
    roomy = load_config("tiny", [f"cluster.cpus_per_worker={cpus / 2}"])
    assert side_by_side(roomy) is roomy  # both fit as they are
    tight = side_by_side(load_config("tiny", [f"cluster.cpus_per_worker={cpus}"]))
    assert tight.cluster.cpus_per_worker == cpus / 2 and tight.cluster.num_workers == 1
    assert side_by_side(load_config("tiny", ["cluster.use_gpu=true"])) is None  # GPUs are not split
