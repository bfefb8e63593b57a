"""What the connected Ray cluster can run, and the checks that stop a study that would hang or lose data.

A study on a cluster fails in two quiet ways that these checks turn into one-line errors:

* **Trials that pend forever.** Ray queues a trial whose resources no node has and waits for
  the autoscaler; if no node type the autoscaler may launch has them either, it waits forever.
  :func:`check_gpu_request` looks at the alive nodes *and* the autoscaler's node types, so a
  cluster that starts with zero GPU workers (the usual ``ray up`` state) passes when a worker
  type advertises GPUs.
* **Results written where nobody reads them.** Ray Tune writes trial checkpoints and results
  to ``--storage-path`` from the node the trial runs on. A local folder on a cluster of several
  machines means each worker's files stay on that worker: the driver never sees them, and a
  trial retried on another node cannot find its checkpoint. :func:`check_storage` refuses that.

Where the autoscaler's node types come from (Ray 2.60, from a connected driver):

1. the GCS cluster config (``private_api.gcs_cluster_config()``: internal KV key
   ``__autoscaler_cluster_config`` in namespace ``__autoscaler``), when a platform reports it
   through GCS's ReportClusterConfig RPC; no Python code of the 2.60 wheel writes it, and it
   is empty on ``ray start`` / ``ray.init`` clusters;
2. otherwise the autoscaler config file the head's monitor process was started with
   (``--autoscaling-config=...``, found among this machine's processes by its
   ``--gcs-address`` port). ``ray up`` always starts the monitor this way (with
   ``~/ray_bootstrap_config.yaml``), v1 and v2 autoscaler alike, and ``ray job submit`` /
   ``ray submit`` run the driver on the head, so the file is readable there. A monitor started
   without that flag (a plain ``ray start --head`` or a local ``ray.init()``) means *no*
   autoscaler: the alive nodes are all there will ever be.

If neither is found (a driver off the head with no reported config) the node types are
unknown: the GPU check then only warns instead of refusing a request that might be fine.

The GCS internal KV keys ``__autoscaling_status`` (v1) and the v2 ``get_cluster_status`` SDK
were considered and rejected: both describe nodes that exist or are being launched, never the
node types the autoscaler *could* launch.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tune_cifar import private_api
from tune_cifar.config import read_yaml
from tune_cifar.errors import UsageError

# Set to 1 when a local --storage-path is a filesystem shared by every node (NFS, EFS, ...).
ALLOW_LOCAL_STORAGE_ENV = "TUNE_CIFAR_ALLOW_LOCAL_STORAGE"
# Node providers whose nodes all run on the driver's machine (and so share its filesystem).
_HEAD_RESOURCE = "node:__internal_head__"


@dataclass(frozen=True)
class Node:
    """One alive Ray node (raylet)."""

    node_id: str
    ip: str
    head: bool
    resources: Mapping[str, float]


@dataclass(frozen=True)
class NodeType:
    """A worker type the autoscaler may launch, up to ``max_workers`` of them."""

    name: str
    resources: Mapping[str, float]
    max_workers: int  # -1: no per-type limit


@dataclass(frozen=True)
class Autoscaler:
    """The autoscaler's launchable worker types (empty: this cluster cannot grow)."""

    node_types: tuple[NodeType, ...]
    provider: str = ""  # "aws", "fake_multinode", ...; "" when not known
    max_workers: int = -1  # the global cap on worker nodes; -1 when not known
    source: str = ""  # where this was read, for messages

    @property
    def can_add_nodes(self) -> bool:
        return self.max_workers != 0 and any(node_type.max_workers != 0 for node_type in self.node_types)


@dataclass(frozen=True)
class ClusterView:
    """The alive nodes and (when known) the autoscaler: everything the checks below need."""

    nodes: tuple[Node, ...]
    autoscaler: Autoscaler | None  # None: unknown (no monitor on this machine, no GCS config)

    @property
    def hosts(self) -> set[str]:
        return {node.ip for node in self.nodes}

    @property
    def max_nodes(self) -> int:
        """Alive nodes plus the workers the autoscaler may still add; -1 when unbounded or unknown."""
        scaler = self.autoscaler
        if scaler is None:
            return -1
        if not scaler.can_add_nodes:
            return len(self.nodes)
        caps = [node_type.max_workers for node_type in scaler.node_types]
        limits = [cap for cap in (scaler.max_workers, -1 if -1 in caps else sum(caps)) if cap >= 0]
        if not limits:
            return -1
        workers = sum(1 for node in self.nodes if not node.head)
        return len(self.nodes) + max(0, min(limits) - workers)


# ---------------------------------------------------------------------------------------------
# Reading the connected cluster


def snapshot() -> ClusterView:
    """Alive nodes and autoscaler node types of the cluster this process is connected to."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("tune_cifar.cluster needs a connected Ray cluster: call ray.init() first")
    return ClusterView(tuple(cluster_nodes()), autoscaler_config())


def cluster_nodes() -> list[Node]:
    """The alive nodes of the connected cluster, head first."""
    import ray

    nodes = [
        Node(
            node_id=entry["NodeID"],
            ip=entry.get("NodeManagerAddress", ""),
            head=_HEAD_RESOURCE in entry.get("Resources", {}),
            resources={key: float(value) for key, value in entry.get("Resources", {}).items()},
        )
        for entry in ray.nodes()
        if entry.get("Alive")
    ]
    return sorted(nodes, key=lambda node: not node.head)


def autoscaler_config() -> Autoscaler | None:
    """The autoscaler's worker types: from the GCS cluster config, else the head's monitor config file."""
    import ray

    try:
        reported = private_api.gcs_cluster_config()
    except Exception:  # older or restricted clusters: fall through to the monitor
        reported = None
    if reported is not None and len(reported.node_group_configs):
        return Autoscaler(
            node_types=tuple(
                NodeType(group.name, dict(group.resources), int(group.max_count))
                for group in reported.node_group_configs
            ),
            max_workers=-1,
            source="GCS cluster config",
        )
    gcs_address = ray.get_runtime_context().gcs_address
    found = _monitor_config_path(gcs_address)
    if found is None:
        return None
    if found == "":
        return Autoscaler(node_types=(), provider="none", max_workers=0, source="monitor without autoscaling config")
    try:
        config = read_yaml(Path(found).expanduser())
    except UsageError:
        return None
    return parse_autoscaler_config(config, source=found)


def parse_autoscaler_config(config: Mapping[str, Any], source: str = "") -> Autoscaler:
    """Worker types of a cluster-launcher config (``cluster.yaml`` or the head's bootstrap copy)."""
    head = config.get("head_node_type")
    global_max = int(config.get("max_workers", -1))
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        if name == head:
            continue
        max_workers = int(spec.get("max_workers", global_max))  # Ray's default: the global cap
        types.append(NodeType(name, {k: float(v) for k, v in (spec.get("resources") or {}).items()}, max_workers))
    provider = str((config.get("provider") or {}).get("type", ""))
    return Autoscaler(tuple(types), provider=provider, max_workers=global_max, source=source)


def _monitor_config_path(gcs_address: str) -> str | None:
    """The ``--autoscaling-config`` of this machine's monitor for ``gcs_address``.

    Returns the path, ``""`` for a monitor started without one (no autoscaling), or None when
    no monitor of this cluster runs here.
    """
    port = gcs_address.rpartition(":")[2]
    same_port = []
    for argv in _process_command_lines():
        if not any(arg.endswith("monitor.py") and "autoscaler" in arg for arg in argv):
            continue
        options = _long_options(argv)
        if options.get("gcs-address") == gcs_address:
            return options.get("autoscaling-config", "")
        if options.get("gcs-address", "").rpartition(":")[2] == port:  # the same GCS under another name
            same_port.append(options.get("autoscaling-config", ""))
    return same_port[0] if len(same_port) == 1 else None


def _process_command_lines() -> Iterable[list[str]]:
    for proc in psutil.process_iter(["cmdline"]):
        try:
            argv = proc.info["cmdline"]
        except psutil.Error:
            continue
        if argv:
            yield argv


def _long_options(argv: list[str]) -> dict[str, str]:
    """``--key=value`` and ``--key value`` pairs of a command line."""
    options = {}
    for index, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        key, sep, value = arg[2:].partition("=")
        if not sep and index + 1 < len(argv) and not argv[index + 1].startswith("--"):
            value = argv[index + 1]
        options[key] = value
    return options


# ---------------------------------------------------------------------------------------------
# The checks search.py runs after connecting


def is_multi_node(view: ClusterView | None = None) -> bool:
    """True when trials may run on more than one *machine* (so they share no local filesystem).

    Counts distinct node IPs among the alive nodes, plus any machine the autoscaler may add
    (whatever its provider: where added nodes do share this machine's folders, as Ray's
    ``fake_multinode`` test provider's do, ``TUNE_CIFAR_ALLOW_LOCAL_STORAGE=1`` says so).
    """
    view = view or snapshot()
    if len(view.hosts) > 1:
        return True
    scaler = view.autoscaler
    return bool(scaler and scaler.can_add_nodes)


def is_remote_storage(storage_path: str) -> bool:
    """A URI every node can reach (``s3://``, ``gs://``, ...), as opposed to a local folder."""
    scheme, sep, _ = storage_path.partition("://")
    return bool(sep) and scheme.lower() not in ("", "file", "local")


def check_storage(storage_path: str, multi_node: bool) -> None:
    """Refuse a local ``--storage-path`` on a cluster of several machines.

    Tune writes each trial's checkpoints and results from the node the trial runs on; a local
    folder would scatter them over the workers, out of the driver's sight, and a trial retried
    on another node would restart from scratch. Set ``TUNE_CIFAR_ALLOW_LOCAL_STORAGE=1`` when
    the folder is a filesystem every node mounts (NFS, EFS).
    """
    if not multi_node or is_remote_storage(storage_path):
        return
    if os.environ.get(ALLOW_LOCAL_STORAGE_ENV, "").strip().lower() in ("1", "true", "yes"):
        return
    raise UsageError(
        f"--storage-path {storage_path} is a local folder, but this Ray cluster spans several machines: "
        "checkpoints and results a trial writes there stay on its worker, invisible to the driver and to "
        "other nodes; use shared storage such as --storage-path s3://BUCKET/tune-cifar "
        f"(or set {ALLOW_LOCAL_STORAGE_ENV}=1 if that folder is a shared mount on every node)"
    )


def check_gpu_request(gpus_per_trial: float, cpus_per_trial: float, view: ClusterView | None = None) -> None:
    """Refuse a trial size that no alive node and no autoscaler node type can ever hold.

    Ray would queue such trials forever. Whole nodes count, not what is free right now: a busy
    node that fits will take the trial later. With the autoscaler's node types unknown (see the
    module docstring) a mismatch is only reported on stderr.
    """
    if gpus_per_trial > 1 and gpus_per_trial != int(gpus_per_trial):
        raise UsageError(f"--gpus-per-trial {gpus_per_trial:g}: above 1 GPU a trial must take whole GPUs")
    view = view or snapshot()
    if any(_fits(node.resources, gpus_per_trial, cpus_per_trial) for node in view.nodes):
        return
    scaler = view.autoscaler
    request = f"--gpus-per-trial {gpus_per_trial:g} --cpus-per-trial {cpus_per_trial:g}"
    if scaler is not None:
        launchable = [t for t in scaler.node_types if t.max_workers != 0] if scaler.max_workers != 0 else []
        if any(_fits(t.resources, gpus_per_trial, cpus_per_trial) for t in launchable):
            return
        types = "; ".join(f"{t.name} {_describe(t.resources)}" for t in launchable) or "none"
        raise UsageError(
            f"{request}: no node can ever hold one trial, so it would wait forever (alive nodes: "
            f"{_describe_nodes(view.nodes)}; autoscaler node types: {types}); ask for less per trial "
            "or add a node type that fits to the cluster config"
        )
    print(
        f"warning: {request}: no alive node fits one trial ({_describe_nodes(view.nodes)}) and the autoscaler's "
        "node types are unknown here; trials will wait until a node that fits joins",
        file=sys.stderr,
    )


def default_gpus_per_trial(view: ClusterView | None = None) -> float:
    """1 when any alive node or launchable node type has a GPU, else 0.

    Counting node types matters on a fresh ``ray up`` cluster: it has no GPU node yet, and a
    default of 0 GPUs would run every trial on a GPU worker's CPUs.
    """
    view = view or snapshot()
    if any(node.resources.get("GPU", 0) > 0 for node in view.nodes):
        return 1.0
    scaler = view.autoscaler
    if scaler is not None and scaler.can_add_nodes:
        return 1.0 if any(t.resources.get("GPU", 0) > 0 and t.max_workers != 0 for t in scaler.node_types) else 0.0
    return 0.0


def node_label() -> str:
    """``hostname/<last 8 hex digits of the Ray node id>`` for the ``node`` column.

    The hostname alone cannot tell apart nodes that share one (containers, or the raylets of a
    ``fake_multinode`` test cluster); the node id suffix can, and maps back to ``ray status``.
    """
    host = platform.node()
    try:
        import ray

        if ray.is_initialized():
            return f"{host}/{ray.get_runtime_context().get_node_id()[-8:]}"
    except Exception:  # a trial outside Ray (python -m tune_cifar.train): the hostname is enough
        pass
    return host


def _fits(resources: Mapping[str, float], gpus: float, cpus: float) -> bool:
    return resources.get("GPU", 0) >= gpus and resources.get("CPU", 0) >= cpus


def _describe(resources: Mapping[str, float]) -> str:
    return f"{resources.get('CPU', 0):g} CPU {resources.get('GPU', 0):g} GPU"


def _describe_nodes(nodes: Iterable[Node]) -> str:
    sizes: dict[str, int] = {}
    for node in nodes:
        label = _describe(node.resources)
        sizes[label] = sizes.get(label, 0) + 1
    return ", ".join(f"{count} x {label}" for label, count in sizes.items()) or "none"
