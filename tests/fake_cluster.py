"""A local autoscaling Ray cluster for tests, built on Ray's ``fake_multinode`` node provider.

Why not :class:`ray.cluster_utils.AutoscalingCluster`: it runs ``ray stop --force`` (which kills
*every* Ray process on the machine, other people's included) and reads a defaults file
(``fake_multi_node/example.yaml``) that the Ray 2.60 wheel does not ship. The same missing file
stops the v2 autoscaler's monitor at start-up, so this harness runs the v1 autoscaler (the
default of a plain ``ray start --head``; ``ray up`` clusters default to v2). It:

* writes a complete autoscaler config (the monitor does not fill defaults in);
* starts ``ray start --head --block`` in its own session, bound to 127.0.0.1, with a private
  ``--temp-dir`` (so ``ray_current_cluster`` is written there, never to ``/tmp/ray``) and a
  free GCS port, with token authentication on and a fresh token passed through the
  environment (``~/.ray/auth_token`` is never read or written);
* makes the autoscaler (the head's monitor process) launch worker "nodes" as extra raylets on
  127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray resolve every node's IP to the
  loopback address and listen on it alone, instead of the machine's outward IP);
* runs the head under a small supervisor that takes the cluster's whole process group down if
  the test process dies (``PR_SET_PDEATHSIG``), and tears down by process id: every process
  in the head's session (fake worker nodes are children of the monitor and share it) plus any
  process whose command line names this cluster's temp dir, SIGTERM then SIGKILL.
  ``ray stop`` is never used.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HEAD_NODE_TYPE = "ray.head.default"  # the fake provider hard-codes this name for the head
RAY_CLI = str(Path(sys.executable).with_name("ray"))
# Runs `ray start --head --block` as its child, as the leader of the cluster's process group
# (every Ray process of the cluster, fake worker nodes included, stays in that group). If the
# test process dies, even by SIGKILL, the kernel sends this supervisor SIGTERM
# (PR_SET_PDEATHSIG, Linux) and it takes the whole group down, so no cluster outlives its test.
SUPERVISOR = """\
import ctypes, os, signal, subprocess, sys, time


def stop(*_):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)
    time.sleep(3)
    os.killpg(0, signal.SIGKILL)


signal.signal(signal.SIGTERM, stop)
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
if os.getppid() == 1:  # the test died before prctl
    stop()
sys.exit(subprocess.Popen(sys.argv[1:]).wait())
"""


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def autoscaler_config(
    gcs_address: str,
    worker_types: Mapping[str, Mapping[str, Any]],
    head_resources: Mapping[str, int],
    idle_timeout_minutes: float = 5,
) -> dict[str, Any]:
    """A complete ``fake_multinode`` autoscaler config (every key the monitor reads)."""
    node_types: dict[str, Any] = {
        HEAD_NODE_TYPE: {"resources": dict(head_resources), "node_config": {}, "min_workers": 0, "max_workers": 0}
    }
    for name, spec in worker_types.items():
        node_types[name] = {"node_config": {}, "min_workers": 0, **spec}
    # launch_multiple: without it the fake provider starts one node per launch request, whatever the count.
    provider = {"type": "fake_multinode", "gcs_address": gcs_address, "launch_multiple": True}
    return {
        "cluster_name": "tune-cifar-fake",
        "max_workers": sum(int(spec.get("max_workers", 0)) for spec in worker_types.values()),
        "upscaling_speed": 2.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": provider,
        "auth": {},
        "docker": {},
        "head_node_type": HEAD_NODE_TYPE,
        "available_node_types": node_types,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@dataclass
class FakeCluster:
    """One fake autoscaling cluster; use as a context manager or call start()/stop()."""

    worker_types: Mapping[str, Mapping[str, Any]]
    head_cpus: int = 0
    head_gpus: int = 0
    object_store_mb: int = 200
    idle_timeout_minutes: float = 5
    start_timeout_s: float = 60
    extra_env: Mapping[str, str] = field(default_factory=dict)  # for the head, its monitor and every fake node
    temp_dir: Path = field(init=False)
    port: int = field(init=False, default=0)
    env: dict[str, str] = field(init=False, default_factory=dict)
    _head: subprocess.Popen[bytes] | None = field(init=False, default=None)
    _seen: dict[int, float] = field(init=False, default_factory=dict)  # pid -> create time

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FakeCluster:
        # Short path: Unix socket names under the session dir must stay below ~107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="tcray-", dir="/tmp"))
        self.port = free_port()
        head_resources = {"CPU": self.head_cpus, "GPU": self.head_gpus}
        config = autoscaler_config(self.address, self.worker_types, head_resources, self.idle_timeout_minutes)
        config_path = self.temp_dir / "autoscaler.yaml"
        config_path.write_text(yaml.safe_dump(config))
        self.env = self._environment()
        cmd = [
            RAY_CLI, "start", "--head", "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={self.port}",
            f"--temp-dir={self.temp_dir}",
            f"--autoscaling-config={config_path}",
            f"--num-cpus={self.head_cpus}",
            f"--num-gpus={self.head_gpus}",
            f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={free_port()}",
            "--dashboard-agent-listen-port=0",
            "--disable-usage-stats",
        ]  # fmt: skip
        with open(self.temp_dir / "ray-start.log", "wb") as log:  # the child keeps its own handle
            self._head = subprocess.Popen(
                [sys.executable, "-c", SUPERVISOR, *cmd],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_until_up()
        except BaseException:
            self.stop()
            raise
        return self

    def _environment(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
        env.update(
            RAY_FAKE_CLUSTER="1",  # required by the fake_multinode provider
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # every node on 127.0.0.1, listening on loopback only
            AUTOSCALER_UPDATE_INTERVAL_S="1",  # react within a second instead of five
            RAY_AUTH_MODE="token",  # explicit: `ray start` and fake workers only turn it on when told
            RAY_AUTH_TOKEN=secrets.token_hex(32),
            RAY_ADDRESS=self.address,  # so `--address auto` and ray.init("auto") find *this* cluster
            RAY_USAGE_STATS_ENABLED="0",
            # every node of this cluster is this machine: a local --storage-path is shared (the
            # public setting a user with an NFS mount sets; the product knows nothing of this provider)
            TUNE_CIFAR_ALLOW_LOCAL_STORAGE="1",
        )
        env.update(self.extra_env)
        return env

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        marker = self.temp_dir / "ray_current_cluster"
        while time.monotonic() < deadline:
            self._remember_processes()
            assert self._head is not None
            if self._head.poll() is not None:
                raise RuntimeError(f"ray start exited with {self._head.returncode}:\n{self.log_tail()}")
            if marker.exists() and self.query("print(len(ray.nodes()))", timeout=30).strip() == "1":
                return
            time.sleep(0.5)
        raise TimeoutError(f"fake cluster did not come up in {self.start_timeout_s}s:\n{self.log_tail()}")

    def query(self, body: str, timeout: float = 60) -> str:
        """Run ``body`` in a fresh Python process connected to the cluster; return its stdout.

        A subprocess keeps the test process free of Ray driver state and of the token-auth
        environment; ``ray`` is imported and connected before ``body`` runs.
        """
        script = "import json, ray\nray.init(address='auto', logging_level='ERROR', log_to_driver=False)\n" + body
        done = subprocess.run(
            [sys.executable, "-c", script], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        self._remember_processes()
        if done.returncode != 0:
            raise RuntimeError(f"query failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return done.stdout

    def nodes(self) -> list[dict[str, Any]]:
        """Alive nodes as ``{"node_id", "head", "resources"}`` dicts."""
        out = self.query(
            "rows = [{'node_id': n['NodeID'], 'head': bool(n.get('Resources', {}).get('node:__internal_head__')),"
            " 'resources': n['Resources']} for n in ray.nodes() if n['Alive']]\nprint(json.dumps(rows))"
        )
        return json.loads(out.strip().splitlines()[-1])

    def worker_nodes(self) -> list[dict[str, Any]]:
        return [node for node in self.nodes() if not node["head"]]

    def log_tail(self, chars: int = 4000) -> str:
        parts = []
        for path in [self.temp_dir / "ray-start.log", *sorted(self.temp_dir.glob("session_latest/logs/monitor.*"))]:
            if path.is_file():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    # ------------------------------------------------------------------ process bookkeeping

    def _remember_processes(self) -> None:
        """Record every live process that belongs to this cluster (pid and start time)."""
        for pid, created in self.processes().items():
            self._seen.setdefault(pid, created)

    def processes(self) -> dict[int, float]:
        """This cluster's live processes: the head's session, plus anything naming its temp dir."""
        import psutil

        if self._head is None:
            return {}
        session = self._head.pid
        tag = str(self.temp_dir)
        found: dict[int, float] = {}
        for proc in psutil.process_iter(["pid", "cmdline", "create_time"]):
            try:
                mine = os.getsid(proc.pid) == session
                if not mine:
                    mine = tag in " ".join(proc.info["cmdline"] or ())
                if mine and proc.pid != os.getpid():
                    found[proc.pid] = proc.info["create_time"]
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
        return found

    def stop(self, grace_s: float = 3) -> None:
        """Terminate every process this cluster started, by pid: SIGTERM, then SIGKILL."""
        import psutil

        self._remember_processes()
        targets = []
        for pid, created in self._seen.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created:  # not a recycled pid
                    targets.append(proc)
            except psutil.Error:
                continue
        for proc in targets:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(targets, timeout=grace_s)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        if self._head is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._head.wait(timeout=5)
        # Anything started after the snapshot above (a worker spawned during shutdown).
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> FakeCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
