"""How many epoch reports per second a study's driver absorbs: ``python benchmarks/driver_throughput.py``.

On a GPU cluster with one-second epochs, 64 GPUs × 4 trials report 256 times a second, and every
report passes through the driver: Ray Tune's event loop, the study's searcher and callbacks (the
Parquet tables, W&B, the console). This drives that machinery with trials that only report (no
training), each report a real one (a conditioned CNN's epoch row, its 18 layer rows and the trial
summary, taken from one real epoch on synthetic data), as fast as the trials can send them, and
prints side by side in one run, one Ray session:

* results per second absorbed by the driver (results it handled ÷ the span between its first and
  last), for each arm: ``bare`` (Ray Tune alone with a study's JSON and CSV loggers and its default
  searcher), each of the
  project's parts alone (``parquet``, ``console``, ``wandb`` offline, ``searcher``: TPE in SQLite),
  and ``all``; with each arm's ratio to ``bare``;
* the CPU time Tune's loop thread spends per result (its own work and the callbacks', however
  many cores the rest leaves it: on a head node with free cores, 1000 / that is the loop's
  ceiling, and the Parquet write's cost below the writer's), and of that the CPU time inside the
  project's own ``on_trial_result`` handlers (Parquet, W&B, console, the searcher's), timed in
  the loop thread: the CPU the project adds to Tune's loop, apart from other threads and
  processes slowing it down on shared cores (a wait on the writer's lock is not CPU, not counted);
* for the arms that write Parquet: the lag from a report to its ``epochs`` row readable on disk
  (a process of its own polls the table as a reader would; median, 95th percentile, maximum);
* the cost of one report's write (``TrialRecord.add`` + ``TableWriter.write``: the Parquet writer
  helper's work) from epoch 1 on and from epoch 100 on, without Ray: whether it grows with the
  trial's length; and of a writer round holding one report of each of the N trials (what the
  writer does when reports come faster than single rounds): 1000 / its ms per report is the
  writer's ceiling in reports per second.

``--trials N --epochs R`` (default 16 × 30). Name the CPU with the figures
(``grep -m1 'model name' /proc/cpuinfo``); the machine should be otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# As a local study starts Ray: token auth on loopback, Tune's old console, only the loggers a study adds.
# Read when ray is imported, so set first.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
os.environ.setdefault("WANDB_SILENT", "true")

from ray import tune

from tune_cifar import cli
from tune_cifar.errors import UsageError

ARMS = ("bare", "parquet", "console", "wandb", "searcher", "all")
SPACE = """
description: the driver-throughput benchmark's trials (they only report)
num_samples: {trials}
max_epochs: {epochs}
data: {{source: synthetic}}
asha: null
fixed: {{model: conditioned_cnn, filters: "8,16,32"}}
params:
  lr: {{loguniform: [1.0e-4, 1.0e-1]}}
"""


def real_report() -> dict[str, Any]:
    """One epoch's report of a conditioned CNN (18 parameter tensors), as a trial sends it."""
    from tune_cifar.config import TrainConfig
    from tune_cifar.data import load_splits
    from tune_cifar.engine import Trainer

    trainer = Trainer(TrainConfig(filters=(8, 16, 32), batch_size=64, epochs=1, precision="fp32"),
                      load_splits("synthetic", subset=200))  # fmt: skip
    report = trainer.train_epoch()
    report.trial = trainer.summary()
    return report.to_result()


def reporter(config: dict[str, Any], template: dict[str, Any], epochs: int, trials: int, times_dir: str) -> None:
    """A trial that reports ``epochs`` copies of ``template`` (epoch numbers set) and nothing else,
    once every trial of the arm is up: the rate then measures the driver at saturation, not Ray
    starting the trials' processes one after another."""
    trial_id = tune.get_context().get_trial_id()
    Path(times_dir, f"{trial_id}.ready").touch()
    deadline = time.time() + 300
    while len(list(Path(times_dir).glob("*.ready"))) < trials and time.time() < deadline:
        time.sleep(0.05)
    sent = []
    for epoch in range(1, epochs + 1):
        result = {**template, "epoch": epoch, "val_acc": 0.1 + 0.8 * epoch / epochs}
        result["layers"] = [{**row, "epoch": epoch} for row in template["layers"]]
        sent.append(time.time())
        tune.report(result)
    Path(times_dir, f"{trial_id}.json").write_text(json.dumps(sent))


def watch(folder: Path, done: Any, seen_out: Any) -> None:
    """Polls a study's ``epochs`` table as a reader would, in a process of its own (a reader in the
    driver's process would compete with Tune's loop for its interpreter, which a real reader does
    not); sends back when each (trial, epoch) appeared. A file is read again only when it changed."""
    import pyarrow.parquet as pq

    seen: dict[tuple[str, int], float] = {}
    read: set[tuple[str, int]] = set()  # (name, mtime_ns) of the files read
    while not done.is_set():
        for part in (folder / "epochs").glob("*.parquet") if (folder / "epochs").is_dir() else []:
            try:
                version = (part.name, part.stat().st_mtime_ns)
                if version in read:
                    continue
                table = pq.read_table(part, columns=["trial_id", "epoch"]).to_pydict()
            except (OSError, ValueError):
                continue  # replaced or removed under us: read it next time
            read.add(version)
            now = time.time()
            for key in zip(table["trial_id"], table["epoch"], strict=True):
                seen.setdefault(key, now)
        time.sleep(0.05)
    seen_out.put(list(seen.items()))


IN_LOOP_CPU = [0.0]  # seconds of loop-thread CPU inside the project's on_trial_result handlers, this arm


def time_project_handlers() -> None:
    """Wrap the project's ``on_trial_result`` handlers (and Ray's searcher glue around the study's
    searcher) so that the loop thread's CPU time inside them adds up in :data:`IN_LOOP_CPU`."""
    from ray.tune.search.search_generator import SearchGenerator

    from tune_cifar.console_callback import ConsoleCallback
    from tune_cifar.parquet_callback import ParquetCallback
    from tune_cifar.wandb_callback import WandbCallback

    for owner in (ParquetCallback, WandbCallback, ConsoleCallback, SearchGenerator):
        handler = owner.on_trial_result

        def timed(*args: Any, _handler: Any = handler, **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return _handler(*args, **kwargs)
            finally:
                IN_LOOP_CPU[0] += time.thread_time() - started

        owner.on_trial_result = timed


class ResultClock(tune.Callback):
    """Notes when the driver handled each result (the rate it absorbs them at), and the CPU time
    Tune's loop thread had used by then (what the loop itself spends per result, however many
    cores the other processes leave it)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.loop_cpu: list[float] = []

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.times.append(time.time())
        self.loop_cpu.append(time.thread_time())


def run_arm(arm: str, args: Any, template_ref: Any, root: Path) -> dict[str, Any]:
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from tune_cifar import searcher as searchers
    from tune_cifar import spaces
    from tune_cifar.console_callback import ConsoleCallback
    from tune_cifar.parquet_callback import ParquetCallback
    from tune_cifar.study_folder import StudyContext
    from tune_cifar.wandb_callback import WandbCallback

    folder = root / arm
    times_dir = root / f"{arm}-times"
    folder.mkdir()
    times_dir.mkdir()
    space_file = root / f"{arm}.yaml"
    space_file.write_text(SPACE.format(trials=args.trials, epochs=args.epochs))
    study = StudyContext.open(folder, arm, args.trials)
    counter = ResultClock()
    callbacks: list[Any] = [counter, JsonLoggerCallback(), CSVLoggerCallback()]  # a study's two loggers
    if arm in ("parquet", "all"):
        callbacks.append(ParquetCallback(study))
    if arm in ("wandb", "all"):
        callbacks.append(WandbCallback(study, "offline"))
    if arm in ("console", "all"):
        callbacks.append(ConsoleCallback(study, args.epochs, interval_s=5.0))
    search = None
    if arm in ("searcher", "all"):
        search = searchers.StudyTrials(searchers.StudySearch(spaces.load(space_file), study))
    spawn = multiprocessing.get_context("spawn")  # not a fork of a process running Ray's threads
    watcher_done, watcher_seen = spawn.Event(), spawn.Queue()
    watcher = spawn.Process(target=watch, args=(folder, watcher_done, watcher_seen), daemon=True)
    watcher.start()
    trainable = tune.with_parameters(
        reporter, template=template_ref, epochs=args.epochs, trials=args.trials, times_dir=str(times_dir)
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 0.05}),
        # what the callbacks read off a trial's config (the searcher's trials get it from the space)
        param_space={} if search else {"lr": tune.loguniform(1e-4, 1e-1), "epochs": args.epochs},
        tune_config=tune.TuneConfig(
            metric="val_acc", mode="max", num_samples=args.trials, search_alg=search, max_concurrent_trials=args.trials
        ),
        run_config=tune.RunConfig(name=arm, storage_path=str(root / "ray"), callbacks=callbacks, verbose=0),
    )
    IN_LOOP_CPU[0] = 0.0
    tuner.fit()
    time.sleep(1.0)  # the watcher's last look
    watcher_done.set()
    seen = dict(watcher_seen.get())
    watcher.join()
    handled = counter.times
    rate = (len(handled) - 1) / (handled[-1] - handled[0]) if len(handled) > 1 else float("nan")
    loop_ms = 1000 * (counter.loop_cpu[-1] - counter.loop_cpu[0]) / max(1, len(handled) - 1)
    lags = []
    for times_file in times_dir.glob("*.json"):
        trial_id = times_file.stem
        for epoch, sent in enumerate(json.loads(times_file.read_text()), start=1):
            if (trial_id, epoch) in seen:
                lags.append(seen[(trial_id, epoch)] - sent)
    project_ms = 1000 * IN_LOOP_CPU[0] / max(1, len(handled))
    return {
        "arm": arm,
        "results": len(handled),
        "rate": rate,
        "loop_ms": loop_ms,
        "project_ms": project_ms,
        "lags": lags,
    }


def report_cost(template: dict[str, Any], root: Path, repeats: int = 20) -> dict[int, float]:
    """Median seconds of one writer round holding one trial's report (``TrialRecord.add`` +
    ``TableWriter.write``), over ``repeats`` reports from epoch 1 on and from epoch 100 on (the
    99 epochs before on disk, as the driver left them)."""
    from tune_cifar.report import EpochReport
    from tune_cifar.tables import TableWriter

    costs = {}
    for at in (1, 100):
        tables = TableWriter.open(root / f"cost-{at}")
        record = tables.record("cost")
        for epoch in range(1, at):
            record.add("epochs", [{**template_epoch(template), "epoch": epoch}])
            record.add("layers", [{**row, "epoch": epoch} for row in template["layers"]])
        tables.write()
        seconds = []
        for epoch in range(at, at + repeats):
            report = EpochReport.from_result({**template, "epoch": epoch})
            started = time.perf_counter()
            record.add("epochs", [report.epoch])
            record.add("layers", [{**row, "epoch": epoch} for row in report.layers])
            record.trial = dict(report.trial)
            tables.write()
            seconds.append(time.perf_counter() - started)
        costs[at] = statistics.median(seconds)
    return costs


def round_cost(template: dict[str, Any], root: Path, trials: int, repeats: int = 10) -> float:
    """Median seconds of a writer round holding one report of each of ``trials`` trials."""
    from tune_cifar.report import EpochReport
    from tune_cifar.tables import TableWriter

    tables = TableWriter.open(root / "round-cost")
    seconds = []
    for epoch in range(1, repeats + 1):
        report = EpochReport.from_result({**template, "epoch": epoch})
        started = time.perf_counter()
        for trial in range(trials):
            record = tables.record(f"t{trial}")
            record.add("epochs", [report.epoch])
            record.add("layers", [{**row, "epoch": epoch} for row in report.layers])
            record.trial = dict(report.trial)
        tables.write()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def template_epoch(template: dict[str, Any]) -> dict[str, Any]:
    from tune_cifar.report import EPOCH_COLUMNS

    return {key: template.get(key) for key in EPOCH_COLUMNS}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16, help="trials at once (default 16)")
    parser.add_argument("--epochs", type=int, default=30, help="reports per trial (default 30)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="which arms (default all)")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.epochs < 2:
        raise UsageError("--trials must be at least 1 and --epochs at least 2")
    import ray

    # As a study lets Tune place every trial it can at once (ray_session.allow_pending_trials): Ray's
    # default for a searcher of our own is one pending trial, which starts the trials one by one.
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(args.trials))
    template = real_report()
    time_project_handlers()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    template_ref = ray.put(template)
    results = []
    with tempfile.TemporaryDirectory(prefix="driver-throughput-") as tmp:
        root = Path(tmp)
        os.environ["WANDB_DIR"] = str(root)
        for arm in args.arms:
            results.append(run_arm(arm, args, template_ref, root))
            print(f"  {arm}: {results[-1]['results']} results handled", file=sys.stderr, flush=True)
        costs = report_cost(template, root)
        shared = round_cost(template, root, args.trials)
    ray.shutdown()
    bare = next((r["rate"] for r in results if r["arm"] == "bare"), float("nan"))
    print(f"{args.trials} trials × {args.epochs} reports, each a real report (epoch row, 18 layer rows, summary)")
    columns = ("arm", "results/s absorbed", "× bare", "Tune's loop: CPU ms per result",
               "… in the project's handlers", "report → row on disk: median / p95 / max (s)")  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    for r in results:
        lags = sorted(r["lags"])
        lag = (f"{statistics.median(lags):.2f} / {lags[int(0.95 * (len(lags) - 1))]:.2f} / {lags[-1]:.2f}"
               if lags else "–")  # fmt: skip
        print(f"| {r['arm']} | {r['rate']:.0f} | {r['rate'] / bare:.2f} | {r['loop_ms']:.2f} | "
              f"{r['project_ms']:.2f} | {lag} |")  # fmt: skip
    print(f"one report's TrialRecord.add + TableWriter.write: {1000 * costs[1]:.1f} ms at epoch 1, "
          f"{1000 * costs[100]:.1f} ms at epoch 100 ({costs[100] / costs[1]:.2f}×)")  # fmt: skip
    per_report = shared / args.trials
    print(
        f"a round of {args.trials} trials' reports: {1000 * shared:.1f} ms, {1000 * per_report:.2f} ms a report "
        f"(the writer's ceiling ≈ {1 / per_report:.0f} reports/s; one report a round: {1 / costs[1]:.0f}/s)"
    )
    return 0


if __name__ == "__main__":
    cli.run(main)
