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

import contextlib
import json
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from tune_cifar import cli, spaces
from tune_cifar import config as cfg
from tune_cifar.cluster import is_remote_storage
from tune_cifar.driver_lock import LOCK_FILE, DriverLock
from tune_cifar.errors import UsageError
from tune_cifar.study_folder import OPTUNA_DB, SETTINGS_FILE, SPACE_COPY, StudyContext
from tune_cifar.tables import TABLES, write_atomic_text

DEFAULT_STORAGE = "studies"
EXIT_INCOMPLETE = 3  # trials left unfinished (resume with --resume)
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C (the shell's convention for SIGINT); resume with --resume
# Flags that define what a study is; --resume takes them from study.json, not the command line.
STUDY_FLAGS = (
    "space",
    "num_samples",
    "max_epochs",
    "data",
    "subset",
    "val_size",
    "seed",
    "precision",
    "seeds",
    "set",
    "grace_period",
)


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
        help="every trial's precision (default: the space's, else auto: bf16 where the device computes it natively)",
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


@dataclass
class Settings:
    """What a study is, written to study.json at the start so --resume rebuilds the same one."""

    name: str
    space: str
    num_samples: int
    max_epochs: int
    data: str
    subset: int | None
    val_size: int | None
    seed: int
    wandb: str
    data_dir: str | None = None
    precision: str | None = None  # None: the space's (else the vocabulary's default, auto)
    seeds: int = 1  # repeats of every grid point
    held: dict[str, Any] | None = None  # --set KEY=VALUE: keys held fixed over the space's own choice
    grace_period: int | None = None  # ASHA's first rung (None: the space's, or no ASHA)

    @classmethod
    def from_args(cls, args: Any, space: spaces.Space, name: str) -> Settings:
        max_epochs = args.max_epochs or space.max_epochs
        held = held_keys(args.set or [], replace(space, max_epochs=max_epochs))
        spaces.check_max_epochs(space, max_epochs, held)
        if args.grace_period is not None and space.asha is None:
            raise UsageError(f"--grace-period: {space.path} has no ASHA (asha: null)")
        grace = args.grace_period or (space.asha.grace_period if space.asha else None)
        if grace is not None and grace > max_epochs:
            raise UsageError(f"--max-epochs {max_epochs} is below the ASHA grace period {grace}")
        seed = args.seed if args.seed is not None else 0
        seeds = args.seeds or space.seeds
        repeated = spaces.hold(space, held).repeated(seeds, seed)
        num_samples = args.num_samples or repeated.num_samples
        if repeated.grid and num_samples != repeated.num_samples:
            raise UsageError(f"{space.path}: a grid runs each of its {repeated.num_samples} combinations once")
        return cls(
            name=name,
            space=str(space.path),
            num_samples=num_samples,
            max_epochs=max_epochs,
            data=args.data or space.source,
            subset=args.subset if args.subset is not None else space.subset,
            val_size=args.val_size if args.val_size is not None else space.val_size,
            seed=seed,
            wandb=args.wandb or ("online" if os.environ.get("WANDB_API_KEY") else "offline"),
            data_dir=args.data_dir,
            precision=args.precision,
            seeds=seeds,
            held=held,
            grace_period=grace,
        )


def held_keys(assignments: list[str], space: spaces.Space) -> dict[str, Any]:
    """``--set KEY=VALUE`` values, checked against the space (a bad value is refused here)."""
    held = cfg.parse_assignments(assignments)
    fixed = spaces.hold(space, held).fixed  # validated, and in the space's form (filters "32,64,128")
    return {key: fixed[key] for key in held}


class StudyPaths:
    """Where things go: Ray's experiment at ``STORAGE/NAME`` (a folder or a URI), the tables,
    Optuna study and W&B runs in a local folder (the same one unless STORAGE is a URI)."""

    def __init__(self, storage: str, name: str):
        if "/" in name or name in (".", "..") or not name.strip():
            raise UsageError(f"--name must be a plain folder name, got {name!r}")
        self.remote = is_remote_storage(storage)
        self.name = name
        self.storage = storage if self.remote else str(Path(storage.removeprefix("file://")).expanduser().resolve())
        self.experiment = f"{self.storage.rstrip('/')}/{name}"
        self.local = (Path(DEFAULT_STORAGE) / name).resolve() if self.remote else Path(self.experiment)

    def exists(self) -> bool:
        if not self.remote:
            return self.local.exists() and any(path.name != LOCK_FILE for path in self.local.iterdir())
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(self.experiment)
        return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound

    def sync(self, direction: str) -> None:
        """Copy the study's own files between the local folder and a remote storage (up or down)."""
        if not self.remote:
            return
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(self.experiment)
        local = pyarrow.fs.LocalFileSystem()
        self.local.mkdir(parents=True, exist_ok=True)
        for item in (*TABLES, OPTUNA_DB, SETTINGS_FILE, SPACE_COPY):
            source, target = (str(self.local / item), f"{path}/{item}")
            source_fs, target_fs = local, fs
            if direction == "down":
                source, target, source_fs, target_fs = target, source, target_fs, source_fs
            info = source_fs.get_file_info(source)
            if info.type == pyarrow.fs.FileType.NotFound:
                continue
            if info.type == pyarrow.fs.FileType.Directory:
                target_fs.create_dir(target, recursive=True)
                pyarrow.fs.copy_files(source, target, source_filesystem=source_fs, destination_filesystem=target_fs)
            else:
                target_fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
                with source_fs.open_input_stream(source) as src, target_fs.open_output_stream(target) as dst:
                    dst.write(src.read())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    paths = StudyPaths(args.storage_path, args.name or "pending")
    if args.resume:
        # A local study is read before the lock, so that a refusal leaves it as it was; a remote one is
        # copied down first, which only the lock holder may do.
        lock = DriverLock(paths.local).acquire() if paths.remote else None
        settings, space = _resume_settings(args, paths)
        lock = lock or DriverLock(paths.local).acquire()
        restore = _has_ray_state(paths)
        if args.num_samples is not None:  # the study grew (a smaller number was refused): record its new size
            stored = json.loads((paths.local / SETTINGS_FILE).read_text())
            stored["num_samples"] = settings.num_samples
            write_atomic_text(paths.local / SETTINGS_FILE, json.dumps(stored, indent=2) + "\n")
    else:
        space = spaces.load(args.space)
        name = args.name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        paths = StudyPaths(args.storage_path, name)
        settings = Settings.from_args(args, space, name)
        if not paths.remote:
            cli.require_writable(Path(paths.storage), "--storage-path")
        _refuse_existing(paths)  # before the lock, which would add a file to someone's study
        created = not paths.local.exists()
        lock = DriverLock(paths.local).acquire()
        _refuse_existing(paths)  # a driver that held the lock before us may have created it meanwhile
        # Written first, so that a driver killed during start-up leaves a study --resume can start.
        shutil.copyfile(space.path, paths.local / SPACE_COPY)
        write_atomic_text(paths.local / SETTINGS_FILE, json.dumps(asdict(settings), indent=2) + "\n")
        restore = False
    try:
        return _start(args, settings, space, paths, restore)
    except RefusedAtStart:
        if not args.resume:  # refused in start-up (data, cluster): a study that cannot run leaves nothing
            for written in (SPACE_COPY, SETTINGS_FILE, LOCK_FILE):
                (paths.local / written).unlink(missing_ok=True)
            if created:
                shutil.rmtree(paths.local, ignore_errors=True)
        raise
    finally:
        lock.release()


class RefusedAtStart(UsageError):
    """Bad input found after the study folder was made but before any trial ran (data, cluster)."""


def _refuse_existing(paths: StudyPaths) -> None:
    if paths.exists():
        raise UsageError(f"study {paths.experiment} exists already; continue it with --resume or pick a new --name")


def _discard_unstarted(paths: StudyPaths) -> None:
    """Before starting a study whose first driver died in start-up: no trial can have reported
    (Ray never saved the experiment), so an Optuna database it may have created holds no result."""
    if any((paths.local / "trials").glob("part-*.parquet")):
        raise UsageError(f"{paths.local}: trial tables but no Ray experiment state; cannot resume it")
    for started in (OPTUNA_DB, "tuner.pkl"):
        (paths.local / started).unlink(missing_ok=True)


def _has_ray_state(paths: StudyPaths) -> bool:
    """Whether Ray saved the experiment's state (``experiment_state-*.json``, written once trials
    run; ``tuner.pkl`` comes earlier): a driver killed during start-up leaves none."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(paths.experiment)
    try:
        items = fs.get_file_info(pyarrow.fs.FileSelector(root))
    except FileNotFoundError:
        return False
    return any(item.base_name.startswith("experiment_state-") for item in items)


def _start(args: Any, settings: Settings, space: spaces.Space, paths: StudyPaths, restore: bool) -> int:
    """Data, Ray, cluster checks, then the study: everything after the study folder is ours."""
    if args.address is None:
        # A study on this machine needs no network: bind Ray to the loopback address (read at import).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Ray 2.60 turns token authentication on for a new local cluster when RAY_AUTH_MODE is
        # unset, and warns that it did so (ray/_private/authentication/authentication_token_setup.py,
        # enable_token_auth_by_default). Asking for that same mode explicitly keeps the protection
        # (loopback is reachable by every local user) and drops a warning the user can do nothing about.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Ray's TensorBoard logger cannot hold the per-layer lists; the JSON and CSV loggers are added explicitly.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    from tune_cifar.data import load_splits

    try:
        _check_reachable(args.address)
        splits = load_splits(settings.data, settings.data_dir, settings.val_size, settings.subset, settings.seed)
        _connect(args.address)
    except UsageError as exc:
        raise RefusedAtStart(str(exc)) from None
    try:
        try:
            gpus, one_node = _check_cluster(args.storage_path, args.cpus_per_trial, args.gpus_per_trial)
        except UsageError as exc:
            raise RefusedAtStart(str(exc)) from None
        limit = args.max_concurrent or space.max_concurrent
        pending = _pending_trials(limit, args.cpus_per_trial, gpus)
        os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(pending))
        return _run(args, settings, space, paths, splits, args.cpus_per_trial, gpus, one_node, restore)
    finally:
        import ray

        ray.shutdown()


def _resume_settings(args: Any, paths: StudyPaths) -> tuple[Settings, spaces.Space]:
    if not paths.exists():
        raise UsageError(f"no study {paths.experiment} to resume")
    paths.sync("down")
    settings_path = paths.local / SETTINGS_FILE
    if not settings_path.is_file():
        raise UsageError(f"{paths.local}: not a tune-cifar study (no {SETTINGS_FILE})")
    settings = Settings(**json.loads(settings_path.read_text()))
    space = spaces.load(paths.local / SPACE_COPY)
    if args.num_samples is not None and args.num_samples > settings.num_samples:
        if space.grid or settings.seeds > 1:
            raise UsageError(f"--num-samples {args.num_samples}: a grid study runs each combination once")
        settings.num_samples = args.num_samples  # more trials: TPE goes on from optuna.db, ASHA from its rungs
    for flag in STUDY_FLAGS:
        given = getattr(args, flag)
        if given is None:
            continue
        stored, given = _stored_and_given(flag, settings, given)
        if stored != given:
            raise UsageError(
                f"--{flag.replace('_', '-')} {given}: the study was started with {stored} ({settings_path}); "
                "a resumed study keeps its settings"
            )
    if args.wandb:
        settings.wandb = args.wandb
    settings.data_dir = args.data_dir or settings.data_dir
    return settings, space


def _stored_and_given(flag: str, settings: Settings, given: Any) -> tuple[Any, Any]:
    """A study flag's stored value and the given one, in one form, so that repeating the
    original command with ``--resume`` added is accepted."""
    if flag == "space":
        return str(Path(settings.space).resolve()), str(spaces.resolve(given).resolve())
    if flag == "set":
        return settings.held or {}, held_keys(given, spaces.load(settings.space))
    return getattr(settings, flag), given


def _check_reachable(address: str | None) -> None:
    """Fail in seconds on a wrong host:port, before loading data (Ray itself retries for a minute)."""
    if address is None or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        raise UsageError(f"--address {address}: cannot reach a Ray cluster there ({exc})") from None


def _connect(address: str | None) -> None:
    import logging

    import ray

    if address is None:
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        return
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--address {address}: cannot join the Ray cluster ({first})") from None


def _check_cluster(storage_path: str, cpus: float, gpus: float | None) -> tuple[float, bool]:
    """Refuse a trial size no node or autoscaler node type can hold (it would pend forever) and a
    local storage folder on a multi-machine cluster.

    Returns the GPUs per trial to ask for, and whether the cluster is one node for good: there
    trial workers are reused (saving a Python + torch start per trial); on a cluster that has
    or may add more nodes every trial gets a fresh worker, so trials spread over new nodes.
    """
    from tune_cifar import cluster

    view = cluster.snapshot()
    gpus = gpus if gpus is not None else cluster.default_gpus_per_trial(view)
    cluster.check_gpu_request(gpus, cpus, view)
    cluster.check_storage(storage_path, cluster.is_multi_node(view))
    return gpus, view.max_nodes == 1


def _pending_trials(max_concurrent: int | None, cpus: float, gpus: float) -> int:
    """How many trials Tune may start placing at once. Ray allows one for a custom searcher not
    wrapped in its ConcurrencyLimiter, which starts trials one by one and gives an autoscaler
    a demand of one; this allows what the cluster holds now (or the concurrency limit)."""
    import ray

    if max_concurrent:
        return max_concurrent
    total = ray.cluster_resources()
    slots = int(total.get("CPU", 0) // cpus)
    if gpus:
        slots = min(slots, int(total.get("GPU", 0) // gpus))
    return max(2, slots)


def _run(
    args: Any,
    settings: Settings,
    space: spaces.Space,
    paths: StudyPaths,
    splits: Any,
    cpus: float,
    gpus: float,
    one_node: bool,
    restore: bool,
) -> int:
    """Build or restore the Tuner, fit it, and close the study: the study proper."""
    from ray import tune

    from tune_cifar.trainable import train_trial

    checkpoints = checkpoint_policy(settings, space, args.checkpoint_every)
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, splits=splits, cpus=cpus, gpus=gpus, checkpoints=checkpoints),
        {"cpu": cpus, "gpu": gpus},
    )
    # What the searcher and callbacks write to, restored ones included (see tune_cifar.study_folder).
    study = StudyContext.open(paths.local, settings.name, settings.num_samples)
    started = time.monotonic()
    try:
        if restore:
            tuner = _restored_tuner(trainable, settings, paths, study)
        else:
            tuner = _new_tuner(trainable, args, settings, space, paths, study, one_node)
            print(
                f"study {settings.name}: {settings.num_samples} trials x up to {settings.max_epochs} epochs of "
                f"{space.name} on {settings.data} ({len(splits.train_y):,} train / {len(splits.val_y):,} validation / "
                f"{len(splits.test_y):,} test images), {cpus:g} CPU + {gpus:g} GPU per trial -> {paths.local}",
                flush=True,
            )
        with _sigint_seen() as interrupted:
            results = tuner.fit()
    finally:
        study.close()
    return _close(args, settings, space, paths, study, results, time.monotonic() - started, interrupted())


def _grace_period(settings: Settings, space: spaces.Space) -> int | None:
    """ASHA's first rung: the study's (``--grace-period`` or the space's, resolved at the start),
    the space's for a study.json older than that setting; None without ASHA."""
    return (settings.grace_period or space.asha.grace_period) if space.asha else None


def checkpoint_policy(settings: Settings, space: spaces.Space, every: int) -> Any:
    """The trials' :class:`~tune_cifar.trainable.CheckpointPolicy`: every ``every`` epochs and at ASHA's rungs."""
    from tune_cifar.trainable import CheckpointPolicy

    factor = space.asha.reduction_factor if space.asha else 1
    return CheckpointPolicy.for_asha(every, _grace_period(settings, space), factor, settings.max_epochs)


def _restored_tuner(trainable: Any, settings: Settings, paths: StudyPaths, study: StudyContext) -> Any:
    """The Tuner of a study Ray saved, its damaged tables rebuilt first (local studies)."""
    from ray import tune

    from tune_cifar import study_callbacks

    if not paths.remote:  # Ray's per-trial results, which the rebuild replays, are local only here
        for line in study_callbacks.repair_tables(study):
            print(line, flush=True)
    tuner = tune.Tuner.restore(paths.experiment, trainable, resume_unfinished=True, resume_errored=True)
    print(f"resuming study {settings.name} ({settings.num_samples} trials) from {paths.experiment}", flush=True)
    return tuner


def _new_tuner(
    trainable: Any,
    args: Any,
    settings: Settings,
    space: spaces.Space,
    paths: StudyPaths,
    study: StudyContext,
    one_node: bool,
) -> Any:
    """The Tuner of a new study: TPE (our searcher), ASHA or FIFO, and the study's callbacks."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from tune_cifar import searcher, study_callbacks
    from tune_cifar.trainable import trial_dirname

    if args.resume:  # the earlier driver died before Ray saved anything: start the study it wrote down
        _discard_unstarted(paths)
        print(f"study {settings.name} never started: starting it from {paths.local / SETTINGS_FILE}", flush=True)
    callbacks: list[Any] = [JsonLoggerCallback(), CSVLoggerCallback(), study_callbacks.ParquetCallback(study)]
    if settings.wandb != "disabled":
        callbacks.append(study_callbacks.WandbCallback(study, settings.wandb))
    callbacks.append(study_callbacks.ConsoleCallback(study, settings.max_epochs))
    scheduler = (
        ASHAScheduler(
            time_attr="epoch",  # the trainer's own count, also across retries from older checkpoints
            max_t=settings.max_epochs,
            grace_period=_grace_period(settings, space),
            reduction_factor=space.asha.reduction_factor,
        )
        if space.asha
        else FIFOScheduler()
    )
    search = searcher.StudySearch(
        _with_settings(space, settings),
        study,
        seed=settings.seed,
        max_concurrent=args.max_concurrent or space.max_concurrent or 0,
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=searcher.METRIC,
            mode="max",
            search_alg=searcher.StudyTrials(search),
            scheduler=scheduler,
            num_samples=settings.num_samples,
            reuse_actors=one_node,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=settings.name,
            storage_path=paths.storage,
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=args.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=0,
        ),
    )


def _close(
    args: Any,
    settings: Settings,
    space: spaces.Space,
    paths: StudyPaths,
    study: StudyContext,
    results: Any,
    wall_s: float,
    interrupted: bool,
) -> int:
    """After the fit: a finished study is closed in Optuna and rid of spare checkpoints; then the
    summary, and for an unfinished one the command that continues it. Returns the exit code."""
    unfinished = max(0, settings.num_samples - results.num_terminated - results.num_errors)
    if not unfinished:
        from tune_cifar import searcher

        searcher.finish_study(study)
        if not args.keep_checkpoints:
            _remove_finished_checkpoints(paths)
    paths.sync("up")
    code = _report(settings, _with_settings(space, settings), paths, results, wall_s)
    if unfinished:
        where = () if paths.storage == str(Path(DEFAULT_STORAGE).resolve()) else ("--storage-path", paths.storage)
        resume = cli.python_command("-m", "tune_cifar.search", "--resume", "--name", settings.name, *where)
        print(f"incomplete: {unfinished} of {settings.num_samples} trials did not finish; continue with: {resume}")
        return EXIT_INTERRUPTED if interrupted else EXIT_INCOMPLETE
    return code


@contextlib.contextmanager
def _sigint_seen() -> Iterator[Callable[[], bool]]:
    """Whether Ctrl-C stopped ``Tuner.fit``, with Tune's graceful stop kept.

    Tune's own SIGINT handler is switched off (``TUNE_DISABLE_SIGINT_HANDLER``) so that this one
    sees the signal; it then sends SIGUSR1, on which Tune stops the same way (saving the
    experiment one last time). A second Ctrl-C is Python's KeyboardInterrupt again.
    """
    seen = threading.Event()

    def on_sigint(signum: int, frame: Any) -> None:
        if seen.is_set():  # the second Ctrl-C (Tune put this handler back after the first): abort
            raise KeyboardInterrupt
        seen.set()
        os.kill(os.getpid(), signal.SIGUSR1)

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield seen.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def _remove_finished_checkpoints(paths: StudyPaths) -> None:
    """A finished study's trials can no longer resume: keep only the best trial's checkpoint (its
    weights), not one per trial (4.9 MB each on the smoke study, gigabytes on a real one)."""
    import pyarrow.fs

    from tune_cifar.tables import finished_trials, read_table

    try:
        best = str(finished_trials(read_table(paths.local, "trials"))["trial_id"].iloc[0])
    except (UsageError, IndexError):
        return
    fs, root = pyarrow.fs.FileSystem.from_uri(paths.experiment)
    for trial in fs.get_file_info(pyarrow.fs.FileSelector(root)):
        name = trial.base_name
        if trial.type != pyarrow.fs.FileType.Directory or not name.startswith("trial_") or name == f"trial_{best}":
            continue
        for item in fs.get_file_info(pyarrow.fs.FileSelector(trial.path)):
            if item.type == pyarrow.fs.FileType.Directory and item.base_name.startswith("checkpoint_"):
                fs.delete_dir(item.path)


def _with_settings(space: spaces.Space, settings: Settings) -> spaces.Space:
    """The space as this study runs it: ``--max-epochs``, ``--precision`` and ``--set`` override
    the file's, and every grid point is repeated over ``--seeds``."""
    fixed = space.fixed if settings.precision is None else {**space.fixed, "precision": settings.precision}
    held = spaces.hold(space, settings.held or {})
    return replace(held, max_epochs=settings.max_epochs, fixed={**fixed, **held.fixed}).repeated(
        settings.seeds, settings.seed
    )


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _report(settings: Settings, space: spaces.Space, paths: StudyPaths, results: Any, wall_s: float) -> int:
    """The final summary: counts, the best configuration, and where everything is."""
    import pandas as pd

    from tune_cifar.tables import finished_trials, read_table

    try:
        trials = read_table(paths.local, "trials")
    except UsageError:
        print(f"study {settings.name}: no trial reported a result -> {paths.local}")
        return 1
    counts = trials["status"].value_counts().to_dict()
    epochs = int(trials["epochs_run"].fillna(0).sum())
    print(
        f"\nstudy {settings.name}: {len(trials)} trials ({counts.get('TERMINATED', 0)} ran all epochs, "
        f"{counts.get('STOPPED', 0)} stopped by ASHA, {counts.get('ERROR', 0)} errors, "
        f"{counts.get('RUNNING', 0)} unfinished); {epochs} of {settings.num_samples * settings.max_epochs} epochs "
        f"in {wall_s:.1f} s"
    )
    done = finished_trials(trials)
    if not done.empty:
        best = done.iloc[0]
        shown = [key for key in (*space.sampled_keys, "filters") if key in cfg.KEYS]
        values = {key: best[key] for key in dict.fromkeys(shown) if not pd.isna(best[key])}
        print(f"best: trial {best['trial_id']} val_acc {best['best_val_acc']:.4f} (epoch {int(best['best_epoch'])})")
        print("  " + " ".join(f"{key}={_short(value)}" for key, value in values.items()))
    where = paths.local
    print(f"tables: {where}/{{trials,epochs,layers}}/ (Parquet; Ray experiment: {paths.experiment})")
    print(f"optuna: {cli.python_command('-m', 'tune_cifar.dashboard', where)}  (study name {settings.name!r})")
    if settings.wandb == "offline":
        print(f"wandb:  {cli.python_command('-m', 'wandb', 'sync')} {where}/wandb/offline-run-*")
    print(f"analyse: {cli.python_command('-m', 'tune_cifar.analysis.best_config', where)}")
    errors = getattr(results, "errors", [])
    return 1 if len(errors) == len(trials) and len(trials) else 0


if __name__ == "__main__":
    cli.run(main)
