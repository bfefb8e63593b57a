"""Ray for one study: the environment it starts in, joining or starting the cluster, and what the
cluster can hold (GPUs per trial, one node or several, how many trials to place at once)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass

import psutil

from tune_cifar.errors import UsageError

# The Python services (autoscaler monitor, dashboard, log monitor) the local Ray of this process
# started: see :func:`shutdown`. Empty when the driver joined a cluster.
_python_services: list[psutil.Process] = []


@dataclass(frozen=True)
class Placement:
    """What the cluster gives each trial, decided once the driver has joined it."""

    cpus: float  # per trial; also the trial's torch threads
    gpus: float  # per trial; a fraction shares one GPU
    one_node: bool  # the cluster is one node for good: trial workers are reused


def prepare_environment(address: str | None) -> None:
    """Environment variables Ray and Tune read at import or start-up; call before importing ray."""
    if address is None:
        # A study on this machine needs no network: bind Ray to the loopback address (read at import).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Ray 2.60 turns token authentication on for a new local cluster when RAY_AUTH_MODE is
        # unset, and warns that it did so. Asking for that same mode explicitly keeps the protection
        # (loopback is reachable by every local user) and drops a warning the user can do nothing about.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # A trial's error reaches Tune, which reports it; Ray would log it a second time, traceback and
    # all, as an error no one retrieved.
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    # Ray's TensorBoard logger cannot hold the per-layer lists; the JSON and CSV loggers are added explicitly.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"


class _WithoutTraceback(logging.Filter):
    """Tune logs every failed trial attempt (and a failed save of its state) with the whole
    traceback; the study's console says it in one line (the trial id and the error's last line)
    and the traceback stays in the trial's ``error.txt``, so the log record keeps its message and
    drops the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = None
        record.exc_text = None
        return True


def quiet_trial_tracebacks() -> None:
    """Install :class:`_WithoutTraceback` on the loggers of Tune's controller and experiment state
    (once): a failed trial, or a failed save of the experiment's state, is then one line."""
    for name in ("ray.tune.execution.tune_controller", "ray.tune.execution.experiment_state"):
        tune_logger = logging.getLogger(name)
        if not any(isinstance(f, _WithoutTraceback) for f in tune_logger.filters):
            tune_logger.addFilter(_WithoutTraceback())


def check_reachable(address: str | None) -> None:
    """Fail in seconds on a wrong host:port, before loading data (Ray itself retries for a minute)."""
    if address is None or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        raise UsageError(f"--address {address}: cannot reach a Ray cluster there ({exc})") from None


def connect(address: str | None) -> None:
    """Start a local Ray (``address`` None) or join the cluster at ``address``.

    Ctrl-C and SIGTERM are held back while ``ray.init`` runs and delivered once it returned: a
    KeyboardInterrupt half-way through it leaves a half-started Ray that crashes the interpreter
    at exit. A local Ray's services (GCS, raylet, and the trial workers the raylet starts) inherit
    SIGTERM blocked, as Ray itself blocks SIGINT for them, so a SIGTERM to the driver's process
    group (a scheduler stopping the job) reaches only the driver, which stops the study gracefully
    and shuts Ray down, instead of killing Ray under a running study. Putting the driver's handlers
    back also replaces the native SIGTERM handler ``ray.init`` installs, which aborts with a stack dump.
    """
    import ray

    driver = psutil.Process()
    children_before = {child.pid for child in driver.children()}
    _python_services.clear()

    held: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: held.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}  # fmt: skip
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # what the services inherit
    try:
        if address is None:
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
            ray_scripts = os.path.dirname(ray.__file__) + os.sep
            _python_services[:] = [child for child in driver.children()
                                   if child.pid not in children_before and _runs(child, ray_scripts)]  # fmt: skip
        else:
            _join(address)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if held:
            signal.raise_signal(held[0])


def _join(address: str) -> None:
    import ray

    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--address {address}: cannot join the Ray cluster ({first})") from None


def place(storage_path: str, cpus: float, gpus: float | None) -> Placement:
    """Refuse a trial size no node or autoscaler node type can hold (it would pend forever) and a
    local storage folder on a multi-machine cluster.

    On a cluster that is one node for good trial workers are reused (saving a Python + torch
    start per trial); on one that has or may add more nodes every trial gets a fresh worker, so
    trials spread over new nodes.
    """
    from tune_cifar import cluster

    view = cluster.snapshot()
    gpus = gpus if gpus is not None else cluster.default_gpus_per_trial(view)
    cluster.check_gpu_request(gpus, cpus, view)
    cluster.check_storage(storage_path, cluster.is_multi_node(view))
    return Placement(cpus, gpus, view.max_nodes == 1)


def allow_pending_trials(max_concurrent: int | None, placement: Placement) -> None:
    """Let Tune start placing as many trials at once as the cluster holds now (or the concurrency
    limit). Ray allows one for a custom searcher not wrapped in its ConcurrencyLimiter, which
    starts trials one by one and gives an autoscaler a demand of one."""
    import ray

    if max_concurrent:
        pending = max_concurrent
    else:
        total = ray.cluster_resources()
        slots = int(total.get("CPU", 0) // placement.cpus)
        if placement.gpus:
            slots = min(slots, int(total.get("GPU", 0) // placement.gpus))
        pending = max(2, slots)
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(pending))


def _runs(process: psutil.Process, ray_scripts: str) -> bool:
    """Whether ``process`` runs a Python program of Ray's own package (not a binary: the GCS and
    the raylet are binaries there too)."""
    try:
        return any(arg.startswith(ray_scripts) and arg.endswith(".py") for arg in process.cmdline())
    except psutil.Error:
        return False


def shutdown() -> None:
    """Stop what :func:`connect` started (nothing when Ray was never imported).

    ``ray.shutdown()`` sends each service it started SIGTERM and waits a second for it to exit
    before it kills it; a local Ray's services have SIGTERM blocked (:func:`connect`), so that was
    five seconds of every command. The three that are Python programs (the autoscaler's monitor,
    the dashboard, the log monitor) hold nothing of the study and nothing the driver waits on, so
    they are killed first; Ray then finds them gone. The GCS and the raylet keep Ray's own order
    (the driver disconnects from them first; a raylet killed under it dumps its log on stderr).
    """
    ray = sys.modules.get("ray")
    if ray is None:
        return
    for service in _python_services:
        with contextlib.suppress(psutil.Error):  # psutil checks it is still that process (pid and start time)
            service.kill()
    # Reaping them here is fine for Ray: its Popen then reads their exit as 0, and ray.shutdown()
    # does not require its services to be alive (check_alive=False).
    psutil.wait_procs(_python_services, timeout=1)
    _python_services.clear()
    ray.shutdown()
