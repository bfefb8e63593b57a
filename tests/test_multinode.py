"""The study on an autoscaling multi-node Ray cluster, without a cloud.

The cluster comes from Ray's ``fake_multinode`` node provider (see ``tests/fake_cluster.py``):
a head with no CPUs and no GPUs, so it takes no trials, and a worker type that advertises
``{"CPU": 1, "GPU": 1}``, up to 3 of them. Its workers are extra raylets on this machine that
the head's autoscaler starts when trials queue for a GPU, like ``ray up``'s EC2 workers.

The GPUs are only a resource label: Ray reserves "a GPU" for each trial, but there is no CUDA
device, so the trial trains on the CPU (its ``device`` column says ``cpu``). What this proves
is the cluster plumbing (autoscaling, placement, data hand-over, result collection), not GPU
training.

Storage: every fake node shares this machine's filesystem, so the study's local
``--storage-path`` is correct here; the fake cluster's environment says so the way a user with
a shared mount does (``TUNE_CIFAR_ALLOW_LOCAL_STORAGE=1``): the product has no special case for it.

The first test checks tune_cifar.cluster against a plain one-node ``ray.init()`` cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from fake_cluster import FakeCluster

REPO = Path(__file__).resolve().parents[1]
WORKER_TYPE = "gpu_worker"
# Test probe, installed as sitecustomize.py in every Python process of the fake cluster and of
# the study's driver: it logs (pid, event) each time a process imports tune_cifar.data and each
# call of its loaders, so the test can show the data is read once, by the driver, and never by
# a trial (which gets the arrays through tune.with_parameters / the object store instead).
DATA_PROBE = """\
import importlib.abc, importlib.util, json, os, sys

_LOG = os.environ.get("TUNE_CIFAR_TEST_DATA_LOG")
_LOADERS = ("load_splits", "synthetic_cifar", "read_cifar_batches", "download_cifar10")


def _record(event, name=""):
    with open(_LOG, "a") as log:
        log.write(json.dumps({"pid": os.getpid(), "event": event, "name": name}) + "\\n")


def _counted(function, name):
    def wrapper(*args, **kwargs):
        _record("call", name)
        return function(*args, **kwargs)
    return wrapper


class _Probe(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "tune_cifar.data":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _record("import")
            for name in _LOADERS:
                if callable(getattr(module, name, None)):
                    setattr(module, name, _counted(getattr(module, name), name))

        spec.loader.exec_module = exec_module
        return spec


if _LOG:
    sys.meta_path.insert(0, _Probe())
"""


# ---------------------------------------------------------------------------------------------
# tune_cifar.cluster against a real one-node Ray cluster


LOCAL_CHECKS = """\
import json, sys
import ray
from tune_cifar import cluster
from tune_cifar.errors import UsageError

ray.init(address="local", num_cpus=1, num_gpus=0, include_dashboard=False, _temp_dir=sys.argv[1],
         logging_level="ERROR", log_to_driver=False)
view = cluster.snapshot()


def refusal(gpus, cpus):
    try:
        cluster.check_gpu_request(gpus, cpus, view)
    except UsageError as exc:
        return str(exc)
    return ""


result = {
    "heads": [node.head for node in view.nodes],
    "cpus": view.nodes[0].resources.get("CPU"),
    "source": view.autoscaler.source if view.autoscaler else None,
    "can_add_nodes": view.autoscaler.can_add_nodes if view.autoscaler else None,
    "max_nodes": view.max_nodes,
    "multi": cluster.is_multi_node(view),
    "default_gpus": cluster.default_gpus_per_trial(view),
    "refusals": {"0x1": refusal(0, 1), "1x1": refusal(1, 1), "0x2": refusal(0, 2)},
    "label": cluster.node_label(),
    "node_id": ray.get_runtime_context().get_node_id(),
}
ray.shutdown()
print(json.dumps(result))
"""


def test_cluster_checks_on_a_local_one_node_cluster() -> None:
    """A plain ``ray.init()`` cluster (1 CPU, no GPU) in a child process bound to 127.0.0.1.

    A child process, because Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` (loopback only)
    when it is imported, which in this process happened at collection time.
    """
    temp_dir = tempfile.mkdtemp(prefix="tcray-local-", dir="/tmp")
    try:
        result = _run_ray_child(LOCAL_CHECKS, temp_dir, marker=temp_dir)  # ray.shutdown() should stop them all
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert result["heads"] == [True] and result["cpus"] == 1
    # found this cluster's monitor by its GCS port and saw it was started without an autoscaling config
    assert result["source"] == "monitor without autoscaling config"
    assert result["can_add_nodes"] is False and result["max_nodes"] == 1
    assert result["multi"] is False and result["default_gpus"] == 0.0
    assert result["refusals"]["0x1"] == ""
    assert "no node can ever hold one trial" in result["refusals"]["1x1"]
    assert "1 x 1 CPU 0 GPU" in result["refusals"]["0x2"]
    assert result["label"].endswith("/" + result["node_id"][-8:])


LOCAL_STOP = """\
import json, os
import psutil
from tune_cifar import ray_session

ray_session.prepare_environment(None)
ray_session.connect(None)
import ray

services = list(ray_session._python_services)
scripts = sorted(os.path.basename(next(a for a in p.cmdline() if a.endswith(".py"))) for p in services)
alive_at_ray_shutdown = []
ray_shutdown = ray.shutdown


def shutdown(*args, **kwargs):
    alive_at_ray_shutdown.extend(p.pid for p in services if p.is_running() and p.status() != psutil.STATUS_ZOMBIE)
    return ray_shutdown(*args, **kwargs)


ray.shutdown = shutdown
ray_session.shutdown()
print(json.dumps({"scripts": scripts, "alive": alive_at_ray_shutdown}))
"""


def test_a_local_rays_stop_kills_its_python_services_first_and_leaves_nothing_running() -> None:
    """The driver's local Ray as a study starts it (services with SIGTERM blocked), stopped by
    ``ray_session.shutdown``, in a child process in a session of its own: it found Ray's three
    Python services and they were gone before ``ray.shutdown()`` began (which would wait a second
    for each to take the SIGTERM they have blocked); after it, no process of that session is left."""
    result = _run_ray_child(LOCAL_STOP)
    assert result["scripts"] == ["dashboard.py", "log_monitor.py", "monitor.py"]  # Ray 2.60's, pinned
    assert result["alive"] == [], "a Python service was still running when ray.shutdown() began"


def _run_ray_child(script: str, *argv: str, marker: str = "\0") -> dict[str, Any]:
    """Run ``script`` (which starts and stops a local Ray, printing JSON last) in a child process in
    a session of its own, loopback only, with a token of its own (ray.init's default token auth
    then leaves ~/.ray alone); its JSON, after checking it exited 0 and left no process of its
    session (or naming ``marker``) running."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_TOKEN=os.urandom(32).hex(), PYTHONPATH=str(REPO))
    child = subprocess.Popen(
        [sys.executable, "-c", script, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = child.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        out, err = child.communicate()
    finally:
        survivors = _still_running(_processes_of(child.pid, marker))
        _kill(survivors)
    assert child.returncode == 0, err[-4000:]
    assert not survivors, f"the stop left processes {[proc.pid for proc in survivors]}"
    return json.loads(out.strip().splitlines()[-1])


def _processes_of(session: int, text: str) -> list[Any]:
    """Live processes in session ``session`` (a child started with start_new_session) or naming ``text``."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error, OSError):
            if proc.pid != os.getpid() and (
                os.getsid(proc.pid) == session or text in " ".join(proc.info["cmdline"] or ())
            ):
                found.append(proc)
    return found


def _still_running(processes: list[Any], grace_s: float = 5.0) -> list[Any]:
    """Those of ``processes`` still running after ``grace_s``: a Ray process that was exiting when it
    was listed (on a loaded machine shutdown's last children take a moment) is not left behind."""
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    return alive


def _kill(processes: list[Any]) -> None:
    import psutil

    for proc in processes:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(processes, timeout=10)


# ---------------------------------------------------------------------------------------------
# The fake autoscaling cluster


@pytest.fixture(scope="module")
def probe_dir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="tcray-probe-", dir="/tmp"))
    (folder / "sitecustomize.py").write_text(DATA_PROBE)
    (folder / "data-calls.jsonl").touch()
    yield folder
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()


@pytest.fixture(scope="module")
def fake_cluster(probe_dir: Path) -> Iterator[FakeCluster]:
    worker = {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 128 * 1024**2}, "max_workers": 3}
    env = {
        "PYTHONPATH": os.pathsep.join([str(probe_dir), str(REPO)]),
        "TUNE_CIFAR_TEST_DATA_LOG": str(probe_dir / "data-calls.jsonl"),
    }
    fake = FakeCluster({WORKER_TYPE: worker}, head_cpus=0, head_gpus=0, extra_env=env)
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()
        assert not fake.processes(), "fake cluster processes survived teardown"


def test_gpu_check_sees_the_autoscalers_gpu_workers(fake_cluster: FakeCluster) -> None:
    """The cluster has no GPU yet; the worker type advertises one, so a 1-GPU trial is fine."""
    out = fake_cluster.query(
        "from tune_cifar import cluster\n"
        "from tune_cifar.errors import UsageError\n"
        "view = cluster.snapshot()\n"
        "cluster.check_gpu_request(1, 1, view)\n"
        "cluster.check_gpu_request(0.25, 1, view)\n"
        "try:\n"
        "    cluster.check_gpu_request(2, 1, view)\n"
        "    refused = ''\n"
        "except UsageError as exc:\n"
        "    refused = str(exc)\n"
        "multi = cluster.is_multi_node(view)\n"
        "cluster.check_storage('/tmp/some-local-folder', multi)\n"
        "print(json.dumps({'alive_gpus': sum(n.resources.get('GPU', 0) for n in view.nodes),\n"
        "    'types': [[t.name, dict(t.resources), t.max_workers] for t in view.autoscaler.node_types],\n"
        "    'provider': view.autoscaler.provider, 'source': view.autoscaler.source, 'refused': refused,\n"
        "    'multi': multi, 'max_nodes': view.max_nodes, 'default_gpus': cluster.default_gpus_per_trial(view)}))\n"
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["alive_gpus"] == 0
    assert [name for name, _, _ in result["types"]] == [WORKER_TYPE]
    assert result["types"][0][1]["GPU"] == 1 and result["types"][0][2] == 3
    assert result["provider"] == "fake_multinode"
    assert result["source"].endswith("autoscaler.yaml")  # read from the monitor's --autoscaling-config
    assert "no node can ever hold one trial" in result["refused"] and f"{WORKER_TYPE} 1 CPU 1 GPU" in result["refused"]
    # the autoscaler may add machines, so a local folder is refused unless every node shares it, as
    # TUNE_CIFAR_ALLOW_LOCAL_STORAGE=1 (set by the fake cluster: its nodes are this machine) says
    assert result["multi"] is True
    assert result["max_nodes"] == 4 and result["default_gpus"] == 1.0


def test_study_refuses_a_trial_no_worker_type_fits(fake_cluster: FakeCluster) -> None:
    """``--gpus-per-trial 2`` fits no node type: one line and exit 2, before any worker starts."""
    command = [
        sys.executable, "-m", "tune_cifar.search", "--space", "smoke", "--data", "synthetic", "--address", "auto",
        "--gpus-per-trial", "2", "--storage-path", str(fake_cluster.temp_dir / "refused"), "--wandb", "disabled",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=fake_cluster.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no node can ever hold one trial" in errors[0], done.stderr[-3000:]
    assert fake_cluster.worker_nodes() == []


def test_study_runs_on_gpu_workers_the_autoscaler_adds(fake_cluster: FakeCluster, probe_dir: Path) -> None:
    head_id = next(node["node_id"] for node in fake_cluster.nodes() if node["head"])
    assert fake_cluster.worker_nodes() == [], "the cluster must start without workers"
    log = probe_dir / "data-calls.jsonl"
    log.write_text("")
    storage = fake_cluster.temp_dir / "studies"
    command = [
        sys.executable, "-m", "tune_cifar.search", "--space", "smoke", "--data", "synthetic",
        "--gpus-per-trial", "1", "--cpus-per-trial", "1", "--address", "auto",
        "--storage-path", str(storage), "--name", "multinode", "--num-samples", "4", "--max-epochs", "2",
        "--wandb", "disabled",
    ]  # fmt: skip
    started = time.monotonic()
    # RAY_ADDRESS in fake_cluster.env makes `--address auto` join this cluster, never another.
    driver = subprocess.Popen(
        command, cwd=REPO, env=fake_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = driver.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver's own process group, by its pid
        output, _ = driver.communicate()
        pytest.fail(f"study did not finish in 240 s:\n{output[-4000:]}\n{fake_cluster.log_tail()}")
    wall_s = time.monotonic() - started
    assert driver.returncode == 0, f"exit {driver.returncode} after {wall_s:.0f}s:\n{output[-6000:]}"

    # The autoscaler added GPU workers on demand.
    workers = fake_cluster.worker_nodes()
    assert len(workers) >= 2, workers
    assert all(node["resources"].get("GPU") == 1 for node in workers)

    # Ray's record of where the trial actors ran: two or more workers, never the head.
    actor_nodes = json.loads(
        fake_cluster.query(
            "actors = ray._private.state.state.actor_table(None).values()\n"
            "print(json.dumps([a['Address']['NodeID'] for a in actors if a['ActorClassName'] == 'ImplicitFunc']))"
        )
        .strip()
        .splitlines()[-1]
    )
    assert head_id not in actor_nodes
    assert len(set(actor_nodes)) >= 2, actor_nodes

    # The study's own tables: every trial finished, on the CPU of a node that holds a GPU slot.
    trials = pd.read_parquet(storage / "multinode" / "trials")
    assert len(trials) == 4
    assert set(trials["status"]) <= {"TERMINATED", "STOPPED"}, trials[["trial_id", "status", "stop_reason"]]
    assert set(trials["device"]) == {"cpu"}  # fake GPUs: no CUDA device behind the GPU resource

    # The data was read once, by the driver; trials imported the module but never loaded data.
    events = [json.loads(line) for line in log.read_text().splitlines()]
    calls = [event for event in events if event["event"] == "call"]
    assert [event["name"] for event in calls].count("load_splits") == 1, calls
    assert {event["pid"] for event in calls} == {driver.pid}, calls
    trial_processes = {event["pid"] for event in events if event["event"] == "import"} - {driver.pid}
    assert trial_processes, "the probe saw no trial process import tune_cifar.data"

    # The `node` column (hostname/node-id suffix, tune_cifar.cluster.node_label) names each trial's node:
    # two or more workers, never the head.
    nodes = set(trials["node"])
    assert len(nodes) >= 2, nodes
    assert all(node.rpartition("/")[2] in {node_id[-8:] for node_id in actor_nodes} for node in nodes), nodes
    assert not any(node.endswith("/" + head_id[-8:]) for node in nodes), nodes
