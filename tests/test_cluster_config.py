"""cluster.yaml, checked offline: Ray's own launcher schema (no cloud credentials needed), the properties the README
promises (a CPU head, an autoscaling GPU group from zero on spot, a CPU group, an idle timeout, pinned versions),
and that a broken copy is rejected, so the schema check is known to bite."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

import kdray

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
FAKE_CLUSTER_YAML = ROOT / "benchmarks" / "fake_cluster.yaml"


def _validate(raw: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does before it touches a cloud: fill the provider's defaults, then check the JSON schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def config(raw) -> dict[str, Any]:
    return _validate(raw)


def test_cluster_yaml_passes_rays_schema(config):
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]


def test_groups_head_gpu_cpu(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"] and not head["node_config"]["InstanceType"].startswith(("g", "p"))

    gpu, cpu = types["gpu_worker"], types["cpu_worker"]
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= config["max_workers"]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))  # AWS GPU families
    assert gpu["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert cpu["min_workers"] == 0 < cpu["max_workers"] <= config["max_workers"]
    assert cpu["node_config"]["InstanceType"].startswith(("m", "c", "r"))
    assert 0 < config["idle_timeout_minutes"] <= 30


def test_versions_are_pinned_and_match_this_checkout(config):
    import ray

    docker = config["docker"]
    images = [docker["head_image"], docker["worker_image"],
              *(t.get("docker", {}).get("worker_image") for t in config["available_node_types"].values())]
    for image in filter(None, images):
        assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py311-(cpu|gpu)", image), image
    assert docker["worker_image"].endswith("-gpu")

    constraints = (ROOT / "constraints.txt").read_text().split()
    assert f"ray=={ray.__version__}" in constraints and any(c.startswith("torch==") for c in constraints)
    install_lists = [config["head_setup_commands"],
                     *(t["worker_setup_commands"] for n, t in config["available_node_types"].items()
                       if n != config["head_node_type"])]
    for commands in install_lists:
        text = "\n".join(commands)
        # kdray from the synced checkout, with torch and ray held to constraints.txt
        assert re.search(r"^pip install .*-c ~/kdray/constraints\.txt .*~/kdray$", text, re.M), text
        assert f"'{kdray.__version__}', '{ray.__version__}'" in text  # the node refuses to start on a mismatch
    assert config["file_mounts"]["~/kdray"] == "."


def test_every_ray_process_uses_token_auth(config):
    assert "~/.ray/auth_token" in config["file_mounts"]
    for cmd in (config["head_start_ray_commands"][-1], config["worker_start_ray_commands"][-1]):
        assert "RAY_AUTH_MODE=token ray start" in cmd
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][-1]


def _typo_top_level(c):
    c["idle_timeout_minute"] = c.pop("idle_timeout_minutes")


def _missing_resources(c):
    del c["available_node_types"]["gpu_worker"]["resources"]


def _min_workers_not_int(c):
    c["available_node_types"]["gpu_worker"]["min_workers"] = "zero"


def _fractional_resource(c):
    c["available_node_types"]["gpu_worker"]["resources"] = {"GPU": 0.5}


def _unknown_node_type_key(c):
    c["available_node_types"]["cpu_worker"]["instance_type"] = "m5.4xlarge"


@pytest.mark.parametrize("breakage", [_typo_top_level, _missing_resources, _min_workers_not_int, _fractional_resource,
                                      _unknown_node_type_key])
def test_a_broken_copy_is_rejected(raw, breakage):
    import jsonschema

    broken = copy.deepcopy(raw)
    breakage(broken)
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken)


def test_fake_cluster_for_the_autoscaling_benchmark_passes_the_schema():
    """benchmarks/fake_cluster.yaml uses the fake multi-node provider, which has no defaults file in the wheel,
    so it is complete on its own and checked without prepare_config."""
    from ray.autoscaler._private.util import validate_config

    fake = yaml.safe_load(FAKE_CLUSTER_YAML.read_text())
    validate_config(fake)
    assert fake["provider"]["type"] == "fake_multinode"
    workers = [t for n, t in fake["available_node_types"].items() if n != fake["head_node_type"]]
    assert workers and all(t["min_workers"] == 0 for t in workers)
