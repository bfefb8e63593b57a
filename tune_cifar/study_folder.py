"""A study folder: the files a study keeps besides its tables, and which folder the driver writes to.

Ray pickles the searcher and the callbacks into the experiment state, and ``--resume`` gets
them back from there, holding whatever folder the first driver used. The study may have
moved since (copied to another machine, down from remote storage). Both therefore hold a
:class:`StudyContext`, which pickles *by reference*: unpickled in a driver that has opened
its own context, it is that context, so every restored object writes to the folder the
resuming driver names; elsewhere (a first start, a test) it is the folder it was made with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

SETTINGS_FILE = "study.json"  # the study's settings (search.Settings), what --resume starts from
SPACE_COPY = "space.yaml"  # the space file the study was started with
OPTUNA_DB = "optuna.db"  # the Optuna study (SQLite): optuna.load_study and optuna-dashboard open it

_opened: StudyContext | None = None


@dataclass(frozen=True)
class StudyContext:
    """The study this driver runs: its local folder (tables, Optuna database, W&B), its name, and
    how many trials it has (``--resume --num-samples N`` raises it)."""

    folder: Path
    name: str
    num_samples: int

    @classmethod
    def open(cls, folder: Path, name: str, num_samples: int) -> StudyContext:
        """The driver's context; searchers and callbacks unpickled after this call get it."""
        global _opened
        _opened = cls(Path(folder), name, num_samples)
        return _opened

    def close(self) -> None:
        global _opened
        if _opened is self:
            _opened = None

    @property
    def optuna_url(self) -> str:
        return storage_url(self.folder)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore, (str(self.folder), self.name, self.num_samples))


def _restore(folder: str, name: str, num_samples: int) -> StudyContext:
    if _opened is not None and _opened.name == name:
        return _opened
    return StudyContext(Path(folder), name, num_samples)


def storage_url(folder: Path) -> str:
    """The Optuna storage URL of a study folder's database."""
    return f"sqlite:///{(Path(folder) / OPTUNA_DB).resolve()}"
