"""A study folder: every path inside it (:class:`StudyFolder`), and which folder the driver writes to.

A results folder of a single run (``tune_cifar.train --out``) is the same kind of folder with
only the tables in it, so the tables, the analysis and the study driver all find their files
through :class:`StudyFolder` rather than joining names of their own.

Ray pickles the searcher and the callbacks into the experiment state, and ``--resume`` gets
them back from there, holding whatever folder the first driver used. The study may have
moved since (copied to another machine, down from remote storage). Both therefore hold a
:class:`StudyContext`, which pickles *by reference*: unpickled in a driver that has opened
its own context, it is that context, so every restored object writes to the folder the
resuming driver names; elsewhere (a first start, a test) it is the folder it was made with.
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tune_cifar.errors import os_reason


@dataclass(frozen=True)
class StudyFolder:
    """The files of one study (or single-run) folder, by what they hold."""

    path: Path

    PLAN = "study.json"  # the study's plan (tune_cifar.plan.StudyPlan): what --resume and analysis load
    SPACE = "space.yaml"  # the space file the study was started with, as it was
    OPTUNA_DB = "optuna.db"  # the Optuna study (SQLite): optuna.load_study and optuna-dashboard open it
    LOCK = ".driver.lock"  # one driver per study (tune_cifar.driver_lock)
    RAY_TUNER = "tuner.pkl"  # Ray's pickled Tuner, written before any trial runs
    RAY_STATE_PREFIX = "experiment_state-"  # Ray's experiment state, written once trials run

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def plan(self) -> Path:
        return self.path / self.PLAN

    @property
    def space(self) -> Path:
        return self.path / self.SPACE

    @property
    def optuna_db(self) -> Path:
        return self.path / self.OPTUNA_DB

    @property
    def optuna_files(self) -> tuple[Path, ...]:
        """The database with its write-ahead log and index (WAL mode: tune_cifar.optuna_db.open_database)."""
        return (self.optuna_db, *(self.optuna_db.with_name(f"{self.OPTUNA_DB}-{end}") for end in ("wal", "shm")))

    @property
    def optuna_url(self) -> str:
        """The Optuna storage URL of the study's database."""
        return f"sqlite:///{self.optuna_db.resolve()}"

    @property
    def lock(self) -> Path:
        return self.path / self.LOCK

    @property
    def wandb(self) -> Path:
        """W&B's offline runs, and its caches and artifact staging (``cache/``, ``data/``, ``artifacts/``)."""
        return self.path / "wandb"

    @property
    def analysis(self) -> Path:
        """Where the analysis scripts write their reports and figures."""
        return self.path / "analysis"

    @property
    def retrain(self) -> Path:
        """The best configuration's final retrain (``best_config --retrain``)."""
        return self.path / "retrain"

    @property
    def damaged(self) -> Path:
        """Table files a resume found unreadable, set aside before their rows were rebuilt."""
        return self.path / "damaged"

    def table(self, name: str) -> Path:
        """One table's Parquet dataset (a folder of part files)."""
        return self.path / name

    def part(self, table: str, trial_id: str) -> Path:
        """One trial's own file of a table: its merged epochs, or its ``trials`` row once finished
        (see :class:`tune_cifar.tables.TableWriter`)."""
        return self.table(table) / f"part-{trial_id}.parquet"

    def round_file(self, table: str, number: int) -> Path:
        """The rows of every trial a driver's writer round wrote, while the study runs."""
        return self.table(table) / f"round-{number:08d}.parquet"

    def live_trials(self) -> Path:
        """The ``trials`` rows of the running trials, while the study runs."""
        return self.table("trials") / "live.parquet"

    def parts(self, table: str) -> list[Path]:
        """A table's files of one trial each (``part-ID.parquet``), in name order."""
        return sorted(self.table(table).glob("part-*.parquet"))

    def rounds(self, table: str) -> list[Path]:
        """A table's round files, oldest first."""
        return sorted(self.table(table).glob("round-*.parquet"))

    def files(self, table: str) -> list[Path]:
        """Every file of a table, as a Parquet reader takes them (in name order: the live file,
        the trials' own files, the rounds)."""
        return sorted(self.table(table).glob("[!.]*.parquet"))

    def has_table(self, name: str) -> bool:
        return self.table(name).is_dir() and bool(self.files(name))

    def trial_dir(self, trial_id: str) -> Path:
        """Ray's folder of one trial (checkpoints, ``result.json``) in a local study."""
        return self.path / trial_dirname(trial_id)

    def study_files(self) -> tuple[str, ...]:
        """What the study itself keeps besides Ray's experiment: copied to and from remote storage."""
        from tune_cifar.tables import TABLES

        return (*TABLES, self.OPTUNA_DB, self.PLAN, self.SPACE)


def part_trial(part: Path) -> str:
    """The trial a part file holds rows of (``part-ID.parquet``)."""
    return part.name.removeprefix("part-").removesuffix(".parquet")


def trial_dirname(trial_id: str) -> str:
    """Short trial folders (Ray's default name embeds every sampled value)."""
    return f"trial_{trial_id}"


_opened: StudyContext | None = None


@dataclass(frozen=True)
class StudyContext:
    """The study this driver runs: its local folder (tables, Optuna database, W&B), its name, and
    how many trials it has (``--resume --num-samples N`` raises it)."""

    folder: StudyFolder
    name: str
    num_samples: int
    write_failures: list[str] = field(default_factory=list, compare=False, repr=False)  # see stop_on_write_failure

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", as_folder(self.folder))

    @classmethod
    def open(cls, folder: Path | StudyFolder, name: str, num_samples: int) -> StudyContext:
        """The driver's context; searchers and callbacks unpickled after this call get it."""
        global _opened
        _opened = cls(folder, name, num_samples)
        return _opened

    def stop_on_write_failure(self, error: OSError) -> None:
        """A file of the study could not be written (a full disk, a quota, a lost mount): remember it
        and ask Tune to stop the study gracefully, as Ctrl-C does (SIGUSR1), once. What was written
        stays whole (every write is atomic); the driver reports the failure in one line and
        ``--resume`` continues once the cause is gone."""
        code = f" ({errno.errorcode.get(error.errno, error.errno)})" if error.errno else ""
        if not self.write_failures:
            os.kill(os.getpid(), signal.SIGUSR1)
        self.write_failures.append(f"cannot write the study in {self.folder.path}: {os_reason(error)}{code}")

    def close(self) -> None:
        global _opened
        if _opened is self:
            _opened = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore, (str(self.folder.path), self.name, self.num_samples))


def as_folder(folder: Path | StudyFolder) -> StudyFolder:
    """A folder given either way, as a :class:`StudyFolder`."""
    return folder if isinstance(folder, StudyFolder) else StudyFolder(Path(folder))


def _restore(folder: str, name: str, num_samples: int) -> StudyContext:
    if _opened is not None and _opened.name == name:
        return _opened
    return StudyContext(StudyFolder(Path(folder)), name, num_samples)
