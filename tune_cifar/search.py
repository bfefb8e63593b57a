"""Run a hyperparameter study: ``python -m tune_cifar.search --space full``.

Ray Tune spreads trials over every CPU and GPU of the machine (or of a running cluster with
``--address``); Optuna TPE proposes configurations from the space file, define-by-run;
ASHA stops weak trials early. Everything a study leaves lives in one folder,
``STORAGE/NAME``: Ray's experiment state and checkpoints, the Parquet tables analysis reads
(``trials``, ``epochs``, ``layers``, ``steps``), the Optuna study (``optuna.db``), W&B runs
(``wandb/``), and the space and settings it was started with (``space.yaml``, ``study.json``)
so that ``--resume`` continues the same study after the driver died.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tune_cifar import cli, ray_session, spaces
from tune_cifar import config as cfg
from tune_cifar.driver_lock import DriverLock
from tune_cifar.errors import UsageError
from tune_cifar.outcome import count_words
from tune_cifar.plan import StudyPlan
from tune_cifar.storage import DEFAULT_STORAGE, StudyStorage
from tune_cifar.study_folder import StudyContext

EXIT_INCOMPLETE = 3  # trials left unfinished (resume with --resume); Ctrl-C and SIGTERM: cli's 130 and 143


def parse_args(argv: Sequence[str] | None) -> Any:
    parser = cli.ArgumentParser(prog="python -m tune_cifar.search", description=__doc__.splitlines()[0])
    parser.add_argument("--space", help="built-in space name (search_spaces/NAME.yaml) or a path to a space file")
    parser.add_argument("--name", help="study name, the folder under --storage-path (default SPACE-YYYYmmdd-HHMMSS)")
    parser.add_argument("--storage-path", default=DEFAULT_STORAGE, help="folder or URI (s3://...) for studies")
    parser.add_argument("--num-samples", type=int, help="trials (default: the space's num_samples)")
    parser.add_argument("--max-epochs", type=int, help="epochs per trial and ASHA's max_t (default: the space's)")
    parser.add_argument("--data", choices=cfg.DATA_SOURCES, help="dataset (default: the space's)")
    parser.add_argument("--data-dir", help="folder holding (or receiving) cifar-10-batches-py/ on the driver")
    parser.add_argument("--subset", type=int, help="a stratified sample of N training+validation images")
    parser.add_argument("--val-size", type=int, help="validation images out of the training pool (default: a tenth)")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="TPE sampler, data split and every trial's seed (0). With --max-concurrent 1 a study is reproduced "
        "exactly; with more trials at once TPE's proposals after its 10 random start-up trials and ASHA's "
        "decisions depend on which trials finish first (README: What --seed reproduces)",
    )
    parser.add_argument(
        "--grace-period",
        type=int,
        help="epochs before ASHA's first decision (default: the space's asha.grace_period); rungs follow at "
        "grace x reduction_factor^k below --max-epochs",
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="hold a vocabulary key at VALUE in every trial, replacing the space's fixed value or its distribution "
        "(repeatable; e.g. --set filters=32,64,128)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        help="run every grid point (or the fixed configuration) with N seeds: --seed, --seed + 1, ... "
        "(default: the space's seeds, else 1)",
    )
    parser.add_argument(
        "--precision",
        choices=cfg.PRECISIONS,
        help="every trial's precision (default: the space's, else auto: the fastest, measured per node and network)",
    )
    parser.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial, also torch threads (1)")
    parser.add_argument("--gpus-per-trial", type=float, help="GPUs per trial, fractions share one (default 1 if any)")
    parser.add_argument("--max-concurrent", type=int, help="trials at once (default: the space's, else all that fit)")
    parser.add_argument("--max-failures", type=int, default=2, help="retries of a failed trial from its checkpoint")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        help="checkpoint every N epochs, and always at ASHA's rungs and the last epoch (1)",
    )
    parser.add_argument("--address", help="join a running Ray cluster (host:port, auto or ray://...)")
    parser.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep every trial's last checkpoint (default: only the best trial's once the study finished)",
    )
    parser.add_argument("--resume", action="store_true", help="continue the interrupted study --name")
    parser.add_argument("--wandb", choices=("offline", "online", "disabled"), help="default online with WANDB_API_KEY")
    args = parser.parse_args(argv)
    if not args.resume and not args.space:
        raise UsageError("--space is required (or --resume --name NAME to continue a study)")
    if args.resume and not args.name:
        raise UsageError("--resume needs --name of the study to continue")
    for flag in ("num_samples", "max_epochs", "subset", "max_concurrent", "seeds", "grace_period", "checkpoint_every"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.cpus_per_trial <= 0:
        raise UsageError(f"--cpus-per-trial must be positive, got {args.cpus_per_trial}")
    if args.gpus_per_trial is not None and args.gpus_per_trial < 0:
        raise UsageError(f"--gpus-per-trial must be >= 0, got {args.gpus_per_trial}")
    if args.max_failures < 0:
        raise UsageError(f"--max-failures must be >= 0, got {args.max_failures}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    storage = StudyStorage(args.storage_path, args.name or "pending")
    if args.resume:
        # A local study is read before the lock, so that a refusal leaves it as it was; a remote one is
        # copied down first, which only the lock holder may do.
        lock = DriverLock(storage.local).acquire() if storage.remote else None
        stored, plan = _resumed_plan(args, storage)
        lock = lock or DriverLock(storage.local).acquire()
        restore = storage.has_ray_state()
        if plan.num_samples != stored.num_samples:  # the study grew: record its new size, nothing else
            dataclasses.replace(stored, num_samples=plan.num_samples).save(storage.local)
        created = False
    else:
        space = spaces.load(args.space)
        name = args.name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        storage = StudyStorage(args.storage_path, name)
        plan = StudyPlan.from_args(args, space, name)
        if not storage.remote:
            cli.require_writable(Path(storage.storage), "--storage-path")
        _refuse_existing(storage)  # before the lock, which would add a file to someone's study
        created = not storage.local.path.exists()
        lock = DriverLock(storage.local).acquire()
        _refuse_existing(storage)  # a driver that held the lock before us may have created it meanwhile
        # Written first, so that a driver killed during start-up leaves a study --resume can start.
        shutil.copyfile(space.path, storage.local.space)
        plan.save(storage.local)
        restore = False
    try:
        return _start(args, plan, storage, restore)
    except (KeyboardInterrupt, cli.Terminated):  # stopped in start-up (or aborted by a second signal)
        print(f"stopped; continue with: {_resume_command(plan, storage)}", flush=True)
        raise
    except RefusedAtStart:
        if not args.resume:  # refused in start-up (data, cluster): a study that cannot run leaves nothing
            for written in (storage.local.space, storage.local.plan, storage.local.lock):
                written.unlink(missing_ok=True)
            if created:
                shutil.rmtree(storage.local.path, ignore_errors=True)
        raise
    finally:
        lock.release()


class RefusedAtStart(UsageError):
    """Bad input found after the study folder was made but before any trial ran (data, cluster)."""


def _refuse_existing(storage: StudyStorage) -> None:
    if storage.exists():
        raise UsageError(f"study {storage.experiment} exists already; continue it with --resume or pick a new --name")


def _resumed_plan(args: Any, storage: StudyStorage) -> tuple[StudyPlan, StudyPlan]:
    """The study's stored plan, and the plan this driver runs (checked against the flags given again)."""
    if not storage.exists():
        raise UsageError(f"no study {storage.experiment} to resume")
    storage.sync("down")
    stored = StudyPlan.load(storage.local)
    return stored, stored.resumed(args)


def _start(args: Any, plan: StudyPlan, storage: StudyStorage, restore: bool) -> int:
    """Data, Ray, cluster checks, then the study: everything after the study folder is ours."""
    ray_session.prepare_environment(args.address)
    from tune_cifar.data import TRAIN_IMAGES, check_sizes, load_splits

    try:
        try:
            if plan.data in TRAIN_IMAGES:  # an unknown source is named by load_splits
                check_sizes(TRAIN_IMAGES[plan.data], plan.val_size, plan.subset)
            ray_session.check_reachable(args.address)
            # The data loads while Ray starts (seconds of Ray's own processes starting): a study
            # waits for the longer of the two, not both.
            with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="data") as loader:
                loading = loader.submit(load_splits, plan.data, plan.data_dir, plan.val_size, plan.subset, plan.seed)
                try:
                    ray_session.connect(args.address)
                finally:
                    splits = loading.result()  # a bad data folder is named before Ray's failure, if both
            placement = ray_session.place(args.storage_path, args.cpus_per_trial, args.gpus_per_trial)
        except UsageError as exc:
            raise RefusedAtStart(str(exc)) from None
        ray_session.allow_pending_trials(plan.max_concurrent, placement)
        return _run(args, plan, storage, splits, placement, restore)
    finally:
        ray_session.shutdown()  # also after a signal in start-up: a Ray left half-started crashes at exit


def _run(args: Any, plan: StudyPlan, storage: StudyStorage, splits: Any, placement: Any, restore: bool) -> int:
    """Build or restore the Tuner, fit it, and close the study: the study proper."""
    from tune_cifar import tuner as tuners

    options = tuners.RunOptions(max_failures=args.max_failures, checkpoint_every=args.checkpoint_every)
    trainable = tuners.trainable(plan, splits, placement, options)
    # What the searcher and callbacks write to, restored ones included (see tune_cifar.study_folder).
    study = StudyContext.open(storage.local, plan.name, plan.num_samples)
    started = time.monotonic()
    try:
        if restore:
            if not storage.remote:  # Ray's per-trial results, which the rebuild replays, are local only here
                from tune_cifar.parquet_callback import repair_tables

                for line in repair_tables(study):
                    print(line, flush=True)
            tuner = tuners.restored_tuner(storage, trainable)
            print(f"resuming study {plan.name} ({plan.num_samples} trials) from {storage.experiment}", flush=True)
        else:
            if args.resume:  # the earlier driver died before Ray saved anything: start the study it wrote down
                storage.discard_unstarted()
                print(f"study {plan.name} never started: starting it from {storage.local.plan}", flush=True)
            tuner = tuners.new_tuner(plan, study, storage, trainable, placement.one_node, options)
            print(
                f"study {plan.name}: {plan.num_samples} trials x up to {plan.max_epochs} epochs of "
                f"{plan.space.name} on {plan.data} ({len(splits.train_y):,} train / {len(splits.val_y):,} validation / "
                f"{len(splits.test_y):,} test images), {placement.cpus:g} CPU + {placement.gpus:g} GPU per trial "
                f"-> {storage.local.path}",
                flush=True,
            )
        ray_session.quiet_trial_tracebacks()
        with _stop_signals() as stopped_by:
            try:
                results = tuner.fit()
            except OSError as exc:  # Ray's own writes (experiment state, result logs) failed
                study.stop_on_write_failure(exc)
                results = None
            except Exception:
                if not study.write_failures:
                    raise
                results = None  # Tune read back a file it could not write whole (its error pickles)
        fit = Fit(results, time.monotonic() - started, stopped_by(), tuple(study.write_failures))
        return _close(args, plan, storage, fit)
    finally:
        study.close()


@dataclass(frozen=True)
class Fit:
    """What ``Tuner.fit`` left: Ray's results, its wall time, and the signal that stopped it (None: none)."""

    results: Any  # None when Tune itself failed to write
    wall_s: float
    stopped_by: int | None
    write_failures: tuple[str, ...] = ()  # files of the study that could not be written (a full disk)


def _close(args: Any, plan: StudyPlan, storage: StudyStorage, fit: Fit) -> int:
    """After the fit: a finished study is closed in Optuna and rid of spare checkpoints; then the
    summary, and for an unfinished one the command that continues it. Returns the exit code.

    Which trials are unfinished is read from the ``trials`` table, not Ray's result grid: Ray
    marks the trials it stops when the driver stops TERMINATED, so a Ctrl-C after the last trial
    started would look like a finished study (and close it in Optuna and delete its checkpoints).
    """
    from tune_cifar import optuna_db

    optuna_db.sync_writers()  # every tell and report the searcher sent is in the database
    if fit.write_failures:  # nothing more is written; the tables hold what was written whole
        print(f"error: {fit.write_failures[0]}; the study stopped. Free space (or fix the folder), then continue "
              f"with: {_resume_command(plan, storage)}", file=sys.stderr)  # fmt: skip
        print(f"stopped: the study could not be written; continue with: {_resume_command(plan, storage)}")
        return EXIT_INCOMPLETE
    from tune_cifar.tables import outcome_counts, read_table

    try:
        trials = read_table(storage.local.path, "trials")
    except UsageError:  # no trial reported anything
        trials = None
    counts = outcome_counts(trials) if trials is not None else {}
    unfinished = max(0, plan.num_samples - sum(n for outcome, n in counts.items() if outcome.final))
    if not unfinished:
        optuna_db.finish_study(plan.name, storage.local)
        if not args.keep_checkpoints:
            _remove_finished_checkpoints(storage, trials)
    optuna_db.checkpoint_database(storage.local)
    storage.sync("up")
    code = _report(plan, storage, fit, trials, counts)
    if unfinished:
        print(f"incomplete: {unfinished} of {plan.num_samples} trials did not finish; continue with: "
              f"{_resume_command(plan, storage)}")  # fmt: skip
        by_signal = {signal.SIGINT: cli.EXIT_INTERRUPTED, signal.SIGTERM: cli.EXIT_TERMINATED}
        return by_signal.get(fit.stopped_by, EXIT_INCOMPLETE)
    return code


@contextlib.contextmanager
def _stop_signals() -> Iterator[Callable[[], int | None]]:
    """Which signal stopped ``Tuner.fit`` (SIGINT from Ctrl-C, SIGTERM from a scheduler), with
    Tune's graceful stop kept; None while none did.

    Tune's own SIGINT handler is switched off (``TUNE_DISABLE_SIGINT_HANDLER``) so that this one
    sees the signal; it then sends SIGUSR1, on which Tune stops the same way (saving the
    experiment one last time). The handlers are (re)installed after ``ray.init``, which puts a
    native handler on SIGTERM that would abort with a stack dump. A second signal aborts at once.
    """
    seen: list[int] = []

    def on_stop(signum: int, frame: Any) -> None:
        if seen:  # the second one (Tune put this handler back after the first): abort
            raise KeyboardInterrupt if signum == signal.SIGINT else cli.Terminated
        seen.append(signum)
        os.kill(os.getpid(), signal.SIGUSR1)

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    previous = {signum: signal.signal(signum, on_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: seen[0] if seen else None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _resume_command(plan: StudyPlan, storage: StudyStorage) -> str:
    where = () if storage.is_default else ("--storage-path", storage.storage)
    return cli.python_command("-m", "tune_cifar.search", "--resume", "--name", plan.name, *where)


def _remove_finished_checkpoints(storage: StudyStorage, trials: Any) -> None:
    """Keep only the best trial's checkpoint (its weights) once the study finished."""
    from tune_cifar.tables import finished_trials

    done = finished_trials(trials) if trials is not None else None
    if done is not None and not done.empty:
        storage.remove_checkpoints_except(str(done["trial_id"].iloc[0]))


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _report(plan: StudyPlan, storage: StudyStorage, fit: Fit, trials: Any, counts: dict[Any, int]) -> int:
    """The final summary of the ``trials`` table (None: no trial reported): counts, the best
    configuration, and where everything is."""
    import pandas as pd

    from tune_cifar.tables import finished_trials

    where = storage.local.path
    if trials is None:
        print(f"study {plan.name}: no trial reported a result -> {where}")
        return 1
    epochs = int(trials["epochs_run"].fillna(0).sum())
    print(
        f"\nstudy {plan.name}: {len(trials)} trials ({count_words(counts)}); "
        f"{epochs} of {plan.num_samples * plan.max_epochs} epochs in {fit.wall_s:.1f} s"
    )
    done = finished_trials(trials)
    if not done.empty:
        best = done.iloc[0]
        shown_keys = [key for key in (*plan.space.sampled_keys, "filters") if key in cfg.KEYS]
        values = {key: best[key] for key in dict.fromkeys(shown_keys) if not pd.isna(best[key])}
        print(f"best: trial {best['trial_id']} val_acc {best['best_val_acc']:.4f} (epoch {int(best['best_epoch'])})")
        print("  " + " ".join(f"{key}={_short(value)}" for key, value in values.items()))
    print(f"tables: {where}/{{trials,epochs,layers}}/ (Parquet; Ray experiment: {storage.experiment})")
    print(f"optuna: {cli.python_command('-m', 'tune_cifar.dashboard', where)}  (study name {plan.name!r})")
    if plan.wandb == "offline":
        print(f"wandb:  {cli.python_command('-m', 'wandb', 'sync')} {storage.local.wandb}/offline-run-*")
    print(f"analyse: {cli.python_command('-m', 'tune_cifar.analysis.best_config', where)}")
    errors = getattr(fit.results, "errors", [])
    return 1 if len(errors) == len(trials) and len(trials) else 0


if __name__ == "__main__":
    cli.run(main)
