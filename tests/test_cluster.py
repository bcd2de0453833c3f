"""cluster.yaml is a valid Ray cluster launcher config (Ray's own schema, after the defaults `ray up` fills in)."""

from pathlib import Path

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


def test_a_broken_cluster_yaml_is_refused():
    import jsonschema
    import pytest

    config = yaml.safe_load(CLUSTER.read_text())
    config["available_node_types"]["gpu_8x"]["max_workers"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(fillout_defaults(config))
