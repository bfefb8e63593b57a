"""Where a study's time goes beyond its epochs: ``python benchmarks/study_overhead.py``.

Runs the same study (default ``benchmarks/one_second_epochs.yaml``: 4 trials x 8 epochs of
about a second, one trial at a time, no ASHA) once per ``--checkpoint-every`` value, each in a
fresh process and folder, and prints for each, side by side:

* the whole command's wall time and ``Tuner.fit``'s against the ideal, the sum of the epochs'
  own seconds (training + validation) divided by the concurrency: the rest is orchestration;
* that rest taken apart (measured, not guessed):
  - *in-trial reporting*: per epoch, Ray's ``time_this_iter_s`` minus the epoch's ``seconds``
    (building the report, the checkpoint's ``torch.save``, Ray persisting it, waiting for the
    driver to take the result), shown separately for epochs with and without a checkpoint;
  - *driver callbacks and searcher*: time inside the Parquet, W&B and console callbacks and in
    the Optuna searcher, timed by wrapping their methods in this benchmark's process;
  - *trial start and the rest*: what remains (actor start, ``tune.with_parameters`` data,
    building the Trainer and counting MACs, Ray's event loop);
* the ratio of each setting's fit and whole-command times to the first setting's;
* Ray's floor, in the same run: a bare Ray Tune study of the same shape (trials x epochs, the
  same concurrency, actors reused as on one node, the study's two result loggers) whose epochs
  sleep the study's mean epoch seconds, started and stopped the plain way (``ray.init``,
  ``ray.shutdown``) in a fresh process: its whole command and ``Tuner.fit`` against its own ideal.
  What the study costs beyond that floor is the project's; the rest is Ray's. (The floor gives
  every trial the same epochs: with ASHA stopping trials early it is an approximation.)

``--joined``: Ray already running, as on a cluster (``ray up``, then the study with ``--address``):
the benchmark starts a one-node Ray head on 127.0.0.1 first (``ray start --head --block``, not
timed) and every study and the floor join it; "Ray start" and "Ray stop" are then joining and
leaving it. Without it each study starts and stops a Ray of its own, as on a laptop.

    python benchmarks/study_overhead.py [--space FILE] [--checkpoint-every 1 4] [--joined] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SPACE = REPO / "benchmarks" / "one_second_epochs.yaml"
# The driver-side methods timed (class label: method), as printed.
RAY_START = "Ray start (ray.init)"
RAY_STOP = "Ray stop (ray.shutdown)"
DRIVER_PARTS = (
    "Parquet callback: on_trial_result",
    "Parquet callback: on_trial_start",
    "Parquet callback: on_trial_complete",
    "W&B callback: on_trial_result",
    "W&B callback: on_trial_complete",
    "console callback: on_step_end",
    "Optuna searcher: suggest",
    "Optuna searcher: on_trial_result",
    "Optuna searcher: on_trial_complete",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(DEFAULT_SPACE))
    parser.add_argument("--checkpoint-every", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--wandb", choices=("offline", "disabled"), default="offline")
    parser.add_argument("--keep", action="store_true", help="keep the study folders")
    parser.add_argument("--joined", action="store_true", help="join a Ray head started first, as on a cluster")
    parser.add_argument("--address", help=argparse.SUPPRESS)  # internal: the head a study or the floor joins
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one study in this process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--floor", nargs=4, type=float, help=argparse.SUPPRESS)  # internal: Ray's floor
    args = parser.parse_args()
    if args.one is not None:
        run_one(args.space, args.one, Path(args.folder), args.wandb, args.address)
        return
    if args.floor is not None:
        trials, epochs, concurrency, seconds = args.floor
        run_floor(int(trials), int(epochs), int(concurrency), seconds, args.address)
        return
    root = Path(tempfile.mkdtemp(prefix="study-overhead-"))
    with contextlib.ExitStack() as stack:
        joining = ["--address", stack.enter_context(ray_head())] if args.joined else []
        measured = []
        for every in args.checkpoint_every:
            folder = root / f"every{every}"
            command = [sys.executable, __file__, "--space", args.space, "--one", str(every), "--folder", str(folder)]
            started = time.perf_counter()
            done = subprocess.run([*command, "--wandb", args.wandb, *joining], cwd=REPO, capture_output=True, text=True)
            whole = time.perf_counter() - started
            if done.returncode != 0:
                sys.exit(f"study with --checkpoint-every {every} failed ({done.returncode}):\n{done.stderr[-3000:]}")
            measured.append(summarise(folder / "bench", every, whole, done.stdout))
        floor = measure_floor(measured[0], joining)
    print_table(measured, args.space, args.wandb)
    print(f"Ray: {'joined, started before the studies (as on a cluster)' if args.joined else 'started by each study'}")
    print_floor(floor, measured)
    if args.keep:
        print(f"study folders: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def ray_head() -> Iterator[str]:
    """A one-node Ray head on 127.0.0.1 for the duration (its address), as ``ray up`` leaves one;
    token auth with a token of its own in the environment, which the studies inherit."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(32).hex(), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    command = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--node-ip-address",
               "127.0.0.1", f"--port={port}", "--include-dashboard=false", "--disable-usage-stats"]  # fmt: skip
    head = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _answers(port):  # the GCS listens: the head is up
            if time.monotonic() > deadline or head.poll() is not None:
                sys.exit(f"the Ray head ({' '.join(command)}) did not start within 60 s")
            time.sleep(0.2)
        time.sleep(3.0)  # the raylet registers after the GCS listens
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def run_one(space: str, every: int, folder: Path, wandb: str, address: str | None) -> None:
    """One study in this process, with the driver-side callbacks and the searcher timed."""
    from tune_cifar import search

    spent: dict[str, float] = defaultdict(float)
    timeline: dict[str, list[float]] = defaultdict(list)  # when the driver saw each event (perf_counter)

    def time_the_driver() -> None:
        # Ray is imported only now, after the driver set its environment up (as in a real run).
        from tune_cifar import console_callback, parquet_callback, searcher, tuner, wandb_callback

        new_tuner = tuner.new_tuner

        def timed_new_tuner(*args: Any, **kwargs: Any) -> Any:
            for owner, label in ((parquet_callback.ParquetCallback, "Parquet callback"),
                                 (wandb_callback.WandbCallback, "W&B callback"),
                                 (console_callback.ConsoleCallback, "console callback"),
                                 (searcher.StudySearch, "Optuna searcher")):  # fmt: skip
                for name in ("on_trial_start", "on_trial_result", "on_trial_complete", "suggest", "on_step_end"):
                    if name in vars(owner):
                        setattr(owner, name, _timed(getattr(owner, name), f"{label}: {name}", spent))
            for name in ("setup", "on_trial_start", "on_trial_complete", "on_experiment_end"):
                owner = console_callback.ConsoleCallback
                setattr(owner, name, _noted(getattr(owner, name), name, timeline))
            return new_tuner(*args, **kwargs)

        tuner.new_tuner = timed_new_tuner

    prepare = search.ray_session.prepare_environment

    def prepare_then_time(address: str | None) -> None:
        prepare(address)
        time_the_driver()

    search.ray_session.prepare_environment = prepare_then_time
    for name, label in (("connect", RAY_START), ("shutdown", RAY_STOP)):  # outside Tuner.fit, inside the command
        setattr(search.ray_session, name, _timed(getattr(search.ray_session, name), label, spent))
    argv = ["--space", space, "--name", "bench", "--storage-path", str(folder), "--wandb", wandb]
    argv += ["--address", address] if address else []
    code = search.main([*argv, "--checkpoint-every", str(every)])
    print("TIMINGS " + json.dumps(spent))
    print("TIMELINE " + json.dumps(timeline))
    sys.exit(code)


def measure_floor(study: dict[str, Any], joining: list[str]) -> dict[str, float]:
    """Ray's floor for ``study``'s shape, in a fresh process: whole command, fit, ideal (seconds)."""
    seconds = study["ideal"] * study["concurrency"] / study["epochs"]  # the study's mean epoch
    trials, epochs = study["trials"], study["epochs"] // study["trials"]
    shape = [str(trials), str(epochs), str(study["concurrency"]), f"{seconds:.4f}"]
    started = time.perf_counter()
    command = [sys.executable, __file__, "--floor", *shape, *joining]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    whole = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"Ray's floor failed ({done.returncode}):\n{done.stderr[-3000:]}")
    fit = float(re.search(r"^FIT ([0-9.]+)$", done.stdout, re.MULTILINE).group(1))
    return {"whole": whole, "fit": fit, "ideal": trials * epochs * seconds / study["concurrency"], "seconds": seconds}


def run_floor(trials: int, epochs: int, concurrency: int, seconds: float, address: str | None) -> None:
    """Bare Ray Tune in this process: ``trials`` x ``epochs`` sleeps of ``seconds``, reported."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # as a local study: no warning, loopback only
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # as tune_cifar.search: these two loggers only
    import logging

    import ray
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    def trainable(config: dict) -> None:
        for epoch in range(1, epochs + 1):
            time.sleep(seconds)
            tune.report({"epoch": epoch})

    if address:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="ray-floor-") as storage:
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 1}),
            tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=concurrency, reuse_actors=True),
            run_config=tune.RunConfig(
                name="floor", storage_path=storage, callbacks=[JsonLoggerCallback(), CSVLoggerCallback()], verbose=0
            ),
        )
        started = time.perf_counter()
        tuner.fit()
        print(f"FIT {time.perf_counter() - started:.3f}")
    ray.shutdown()


def print_floor(floor: dict[str, float], measured: list[dict[str, Any]]) -> None:
    print(f"Ray's floor (bare Ray Tune, the same shape, epochs that sleep {floor['seconds']:.2f} s; fresh process):")
    print(f"  whole command {floor['whole']:.1f} s = {floor['whole'] / floor['ideal']:.2f}x its ideal "
          f"{floor['ideal']:.1f} s; Tuner.fit {floor['fit']:.1f} s = {floor['fit'] / floor['ideal']:.2f}x")  # fmt: skip
    for m in measured:
        print(f"  --checkpoint-every {m['every']}: the study's orchestration beyond Ray's floor: "
              f"whole command {m['whole'] - m['ideal'] - (floor['whole'] - floor['ideal']):+.1f} s, "
              f"Tuner.fit {m['fit'] - m['ideal'] - (floor['fit'] - floor['ideal']):+.1f} s")  # fmt: skip


def _timed(method: Any, label: str, spent: dict[str, float]) -> Any:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - started

    return wrapper


def _noted(method: Any, event: str, timeline: dict[str, list[float]]) -> Any:
    """``method``, noting when it was called (and, for the experiment's end, when it returned)."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        timeline[event].append(time.perf_counter())
        try:
            return method(*args, **kwargs)
        finally:
            if event == "on_experiment_end":
                timeline["experiment ended"].append(time.perf_counter())

    return wrapper


def summarise(folder: Path, every: int, whole: float, stdout: str) -> dict[str, Any]:
    import pandas as pd

    from tune_cifar.plan import StudyPlan
    from tune_cifar.trainable import CheckpointPolicy

    plan = StudyPlan.load(folder)
    policy = CheckpointPolicy(every, plan.rungs)
    fit = float(re.search(r"epochs in ([0-9.]+) s", stdout).group(1))
    callbacks = json.loads(re.search(r"^TIMINGS (.*)$", stdout, re.MULTILINE).group(1))
    timeline = json.loads(re.search(r"^TIMELINE (.*)$", stdout, re.MULTILINE).group(1))
    epochs = pd.read_parquet(folder / "epochs")
    gaps: dict[bool, list[float]] = {True: [], False: []}
    set_up = 0.0  # from the trial function's start to its first report, beyond the epoch itself
    trial_wall = 0.0
    for results in folder.glob("trial_*/progress.csv"):
        rows = pd.read_csv(results).to_dict("records")
        trial_wall += rows[-1]["time_total_s"]
        set_up += rows[0]["time_this_iter_s"] - rows[0]["seconds"]
        for row in rows[1:]:
            gaps[policy.due(row["epoch"], plan.max_epochs)].append(row["time_this_iter_s"] - row["seconds"])
    compute = float(epochs["seconds"].sum())
    concurrency = _concurrency(plan.max_concurrent)
    reporting = (sum(gaps[True]) + sum(gaps[False])) / concurrency
    driver = sum(callbacks.get(part, 0.0) for part in DRIVER_PARTS)
    return {
        "every": every,
        "epochs": len(epochs),
        "trials": plan.num_samples,
        "concurrency": concurrency,
        "budget": plan.num_samples * plan.max_epochs,
        "whole": whole,
        "fit": fit,
        "ideal": compute / concurrency,
        "per epoch": (fit - compute / concurrency) * concurrency / len(epochs),
        "with checkpoint": _mean(gaps[True]),
        "without checkpoint": _mean(gaps[False]),
        "reporting": reporting,
        "driver": driver,
        "driver parts": callbacks,
        "set-up": set_up / concurrency,
        "between trials": fit - trial_wall / concurrency,
        # the driver's view: Tune's start to the first trial's start, and the last trial's end to
        # the experiment's end (W&B closing its runs, the tables merged)
        "before first trial": min(timeline["on_trial_start"]) - min(timeline["setup"]),
        "after last trial": max(timeline["experiment ended"]) - max(timeline["on_trial_complete"]),
    }


def print_table(measured: list[dict[str, Any]], space: str, wandb: str) -> None:
    first = measured[0]

    def timed(part: str) -> Any:  # one driver-side part's seconds
        return lambda m: f"{m['driver parts'].get(part, 0.0):.2f}"

    rows: list[tuple[str, Any]] = [
        ("--checkpoint-every", lambda m: f"{m['every']}"),
        ("whole command, s", lambda m: f"{m['whole']:.1f}"),
        ("Tuner.fit, s", lambda m: f"{m['fit']:.1f}"),
        ("ideal (epoch seconds / concurrency), s", lambda m: f"{m['ideal']:.1f}"),
        ("orchestration = fit - ideal, s", lambda m: f"{m['fit'] - m['ideal']:.1f} ({1 - m['ideal'] / m['fit']:.0%})"),
        ("  per epoch, s", lambda m: f"{m['per epoch']:.3f}"),
        ("  trial set-up (Trainer, THOP, loaders) to 1st report, s", lambda m: f"{m['set-up']:.1f}"),
        ("  reporting after each later epoch, s", lambda m: f"{m['reporting']:.1f}"),
        ("    per epoch with a checkpoint, s", lambda m: _fmt(m["with checkpoint"])),
        ("    per epoch without one, s", lambda m: _fmt(m["without checkpoint"])),
        ("  between trials (Ray: end, schedule, start), s", lambda m: f"{m['between trials']:.1f}"),
        ("    Tune's start to the first trial's start, s", lambda m: f"{m['before first trial']:.1f}"),
        ("    the last trial's end to the experiment's end, s", lambda m: f"{m['after last trial']:.1f}"),
        ("outside Tuner.fit (whole command - fit), s", lambda m: f"{m['whole'] - m['fit']:.1f}"),
        (f"  {RAY_START}, s", timed(RAY_START)),
        (f"  {RAY_STOP}, s", timed(RAY_STOP)),
        ("driver callbacks + searcher, s", lambda m: f"{m['driver']:.1f}"),
        *[(f"  {part}, s", timed(part)) for part in DRIVER_PARTS],
        ("epochs trained / num_samples x max_epochs", lambda m: f"{m['epochs']} / {m['budget']}"),
        ("whole command / ideal", lambda m: f"{m['whole'] / m['ideal']:.2f}x"),
        ("fit / first column's fit", lambda m: f"{m['fit'] / first['fit']:.2f}x"),
    ]
    width = max(len(label) for label, _ in rows) + 2
    print(f"{Path(space).name}, W&B {wandb}: one column per --checkpoint-every, each a fresh study and process")
    for label, cell in rows:
        print(f"{label:<{width}}" + "".join(f"{cell(m):>16}" for m in measured))
    print("Trial-side parts come from Ray's progress.csv (time_this_iter_s minus the epoch's own seconds; between")
    print("trials = fit minus the trials' time_total_s). Driver callbacks run in Ray's event loop: they delay a")
    print("trial only when they hold up taking its next result or starting the next trial, so they overlap the rest.")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _concurrency(max_concurrent: int | None) -> int:
    """Trials that could run at once: the study's max_concurrent, bounded by the CPUs (1 CPU a trial)."""
    return max(1, min(max_concurrent or os.cpu_count() or 1, os.cpu_count() or 1))


if __name__ == "__main__":
    main()
