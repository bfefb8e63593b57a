"""``cluster.yaml`` against Ray's own cluster-config validation, and the cluster checks without a cluster.

Validation goes the way ``ray up`` goes (``prepare_config`` fills in the AWS defaults, then
``validate_config`` checks Ray's JSON schema ``ray-schema.json`` and the node-type rules), plus
the schema on the file as written, because the defaults would otherwise quietly fill in a
missing ``cluster_name`` or ``provider``. Only the EC2 calls of ``ray up`` are left out.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tune_cifar import cluster
from tune_cifar.cluster import Autoscaler, ClusterView, Node, NodeType
from tune_cifar.errors import UsageError

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
RAY_SCHEMA = Path(ray.autoscaler.__file__).with_name("ray-schema.json")


def load_cluster_yaml() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_validate(config: dict[str, Any]) -> None:
    """Raise what Ray raises for ``config``: schema errors, bad node types, a missing head type."""
    jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))
    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_passes_ray_validation() -> None:
    ray_validate(load_cluster_yaml())


@pytest.mark.parametrize("field", ["cluster_name", "provider", "head_node_type", "available_node_types"])
def test_removing_a_required_field_fails_validation(field: str) -> None:
    config = load_cluster_yaml()
    del config[field]
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)):
        ray_validate(config)


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(lambda c: c.update(head_node_type="gpu_8x"), id="head-type-undefined"),
        pytest.param(lambda c: c["available_node_types"]["gpu_1x"].pop("resources"), id="node-type-without-resources"),
        pytest.param(lambda c: c["available_node_types"]["gpu_1x"].update(gpus=1), id="unknown-node-type-key"),
        pytest.param(lambda c: c["available_node_types"]["gpu_1x"].update(min_workers=99), id="min-workers-over-cap"),
    ],
)
def test_broken_node_types_fail_validation(breakage: Any) -> None:
    config = load_cluster_yaml()
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validate(config)


def test_docker_image_is_ray_gpu_image_of_installed_version() -> None:
    image = load_cluster_yaml()["docker"]["image"]
    assert ray.__version__ in image
    # {Ray version}-py{XY}-{gpu|cuXXX}: Ray's tag scheme for its CUDA images.
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py3\d+-(gpu|cu\d+)", image), image


def test_head_takes_no_trials_and_workers_advertise_gpus() -> None:
    config = load_cluster_yaml()
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {name: spec for name, spec in types.items() if name != config["head_node_type"]}
    gpus = sorted(spec["resources"]["GPU"] for spec in workers.values())
    assert gpus == [1, 4]
    markets = [spec["node_config"].get("InstanceMarketOptions", {}).get("MarketType") for spec in workers.values()]
    assert "spot" in markets
    assert all("IamInstanceProfile" in spec["node_config"] for spec in workers.values())  # trials write to S3
    assert all(spec["max_workers"] <= config["max_workers"] for spec in workers.values())


def test_every_node_gets_the_repo_and_installs_it() -> None:
    config = load_cluster_yaml()
    mounts = config["file_mounts"]
    repo = next(remote for remote, local in mounts.items() if local == ".")
    assert any(f"pip install --quiet -e {repo}" in command for command in config["setup_commands"])
    assert any("torch" in command for command in config["setup_commands"])


def test_every_user_setting_is_marked() -> None:
    text = CLUSTER_YAML.read_text()
    for key in ("region:", "availability_zone:", "ssh_user:", "InstanceType:", "Arn:", "max_workers:", "cluster_name:"):
        lines = [line for line in text.splitlines() if line.strip().startswith(key)]
        assert lines, key
        assert all("CHANGE" in line for line in lines), (key, lines)
    assert "s3://" in text and "KeyName" in text


def test_cluster_yaml_node_types_feed_the_gpu_check() -> None:
    """A fresh `ray up` cluster is a head with 0 CPUs; the autoscaler's types decide what fits."""
    scaler = cluster.parse_autoscaler_config(load_cluster_yaml(), source=str(CLUSTER_YAML))
    assert scaler.provider == "aws" and {t.name for t in scaler.node_types} == {"gpu_1x", "gpu_4x"}
    view = ClusterView((Node("h", "10.0.0.1", True, {"memory": 1e10}),), scaler)
    cluster.check_gpu_request(0.25, 1, view)
    cluster.check_gpu_request(4, 48, view)
    with pytest.raises(UsageError, match="no node can ever hold one trial"):
        cluster.check_gpu_request(8, 1, view)
    assert cluster.is_multi_node(view)
    assert cluster.default_gpus_per_trial(view) == 1.0
    assert view.max_nodes == 1 + 8


# ---------------------------------------------------------------------------------------------
# tune_cifar.cluster on hand-made cluster views (the real-Ray tests are in test_multinode.py)

HEAD = Node("head", "10.0.0.1", True, {"CPU": 0.0})
CPU_WORKER = Node("w1", "10.0.0.2", False, {"CPU": 8.0})
GPU_TYPE = NodeType("gpu", {"CPU": 4.0, "GPU": 1.0}, 3)


@pytest.mark.parametrize(
    ("path", "remote"),
    [("s3://bucket/x", True), ("gs://b/x", True), ("abfs://c@a/x", True), ("studies", False), ("/mnt/x", False),
     ("file:///tmp/x", False), ("~/studies", False)],
)  # fmt: skip
def test_remote_storage(path: str, remote: bool) -> None:
    assert cluster.is_remote_storage(path) is remote


def test_check_storage_refuses_local_folder_on_several_machines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cluster.ALLOW_LOCAL_STORAGE_ENV, raising=False)
    cluster.check_storage("studies", multi_node=False)
    cluster.check_storage("s3://bucket/studies", multi_node=True)
    with pytest.raises(UsageError) as excinfo:
        cluster.check_storage("/home/me/studies", multi_node=True)
    message = str(excinfo.value)
    assert "\n" not in message and "s3://" in message and "invisible to the driver" in message
    monkeypatch.setenv(cluster.ALLOW_LOCAL_STORAGE_ENV, "1")
    cluster.check_storage("/mnt/efs/studies", multi_node=True)


def test_is_multi_node_counts_machines() -> None:
    assert not cluster.is_multi_node(ClusterView((HEAD,), Autoscaler(())))
    assert cluster.is_multi_node(ClusterView((HEAD, CPU_WORKER), Autoscaler(())))
    assert cluster.is_multi_node(ClusterView((HEAD,), Autoscaler((GPU_TYPE,), provider="aws")))
    # several raylets on one machine: one host, but an autoscaler that may add nodes counts whatever
    # its provider (TUNE_CIFAR_ALLOW_LOCAL_STORAGE=1 is how a user says the nodes share a folder)
    local = [Node(f"n{i}", "127.0.0.1", i == 0, {}) for i in range(3)]
    assert not cluster.is_multi_node(ClusterView(tuple(local), Autoscaler(())))
    assert cluster.is_multi_node(ClusterView(tuple(local), Autoscaler((GPU_TYPE,), provider="fake_multinode")))
    # unknown autoscaler: only what is alive counts
    assert not cluster.is_multi_node(ClusterView((HEAD,), None))


def test_gpu_check_uses_alive_nodes_then_node_types(capsys: pytest.CaptureFixture[str]) -> None:
    alive_only = ClusterView((HEAD, CPU_WORKER), Autoscaler(()))
    cluster.check_gpu_request(0, 8, alive_only)
    with pytest.raises(UsageError, match=r"alive nodes: 1 x 0 CPU 0 GPU, 1 x 8 CPU 0 GPU; autoscaler node types: none"):
        cluster.check_gpu_request(1, 1, alive_only)
    scalable = ClusterView((HEAD,), Autoscaler((GPU_TYPE,)))
    cluster.check_gpu_request(1, 4, scalable)
    cluster.check_gpu_request(0.25, 1, scalable)
    with pytest.raises(UsageError, match="gpu 4 CPU 1 GPU"):
        cluster.check_gpu_request(1, 5, scalable)
    capped = ClusterView((HEAD,), Autoscaler((NodeType("gpu", {"CPU": 4.0, "GPU": 1.0}, 0),)))
    with pytest.raises(UsageError):
        cluster.check_gpu_request(1, 1, capped)
    cluster.check_gpu_request(1, 1, ClusterView((HEAD,), None))  # unknown: warn, do not refuse
    assert "node types are unknown" in capsys.readouterr().err
    with pytest.raises(UsageError, match="whole GPUs"):
        cluster.check_gpu_request(1.5, 1, scalable)


def test_default_gpus_per_trial_counts_launchable_types() -> None:
    assert cluster.default_gpus_per_trial(ClusterView((HEAD,), Autoscaler((GPU_TYPE,)))) == 1.0
    assert cluster.default_gpus_per_trial(ClusterView((HEAD, CPU_WORKER), Autoscaler(()))) == 0.0
    assert cluster.default_gpus_per_trial(ClusterView((HEAD,), None)) == 0.0


def test_max_nodes() -> None:
    assert ClusterView((HEAD,), None).max_nodes == -1
    assert ClusterView((HEAD, CPU_WORKER), Autoscaler(())).max_nodes == 2
    assert ClusterView((HEAD, CPU_WORKER), Autoscaler((GPU_TYPE,), max_workers=10)).max_nodes == 1 + 3
    assert ClusterView((HEAD,), Autoscaler((GPU_TYPE,), max_workers=2)).max_nodes == 3
    assert ClusterView((HEAD,), Autoscaler((NodeType("x", {}, -1),), max_workers=-1)).max_nodes == -1


def test_parse_autoscaler_config_defaults_type_caps_to_the_global_cap() -> None:
    config = {
        "max_workers": 5,
        "head_node_type": "head",
        "provider": {"type": "fake_multinode"},
        "available_node_types": {"head": {"resources": {}}, "w": {"resources": {"CPU": 1, "GPU": 1}}},
    }
    scaler = cluster.parse_autoscaler_config(config)
    assert scaler.node_types == (NodeType("w", {"CPU": 1.0, "GPU": 1.0}, 5),)
    assert scaler.provider == "fake_multinode" and scaler.max_workers == 5


def test_long_options() -> None:
    argv = ["python", "-u", "monitor.py", "--gcs-address=1.2.3.4:6379", "--autoscaling-config", "/x.yaml", "--flag"]
    assert cluster._long_options(argv) == {"gcs-address": "1.2.3.4:6379", "autoscaling-config": "/x.yaml", "flag": ""}
