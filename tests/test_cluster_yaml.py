"""cluster.yaml is valid for Ray's cluster launcher and keeps the dashboard on localhost."""
import os

import yaml

from tests.conftest import ROOT


def test_cluster_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    with open(os.path.join(ROOT, "cluster.yaml")) as stream:
        config = yaml.safe_load(stream)
    validate_config(prepare_config(config))  # fills Ray's defaults, then raises on any schema violation
    assert set(config["available_node_types"]) == {"head", "cpu_worker", "gpu_worker"}
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert any("pip install" in command and "-e ." in command for command in config["setup_commands"])
