"""Optuna TPE behind Ray Tune, with ASHA-stopped trials told to Optuna as PRUNED.

Ray 2.60's ``OptunaSearch`` tells Optuna that a trial ASHA stopped after 5 of 100 epochs is
COMPLETE with its 5-epoch score, so TPE learns low-budget scores as if they were final and
keeps proposing configurations that merely start fast. :class:`StudySearch` fixes that:

* every epoch's ``val_acc`` is an intermediate value (``trial.report(value, epoch)``),
  including the last one before a stop (Ray does not pass that one to the searcher);
* a trial that ran fewer epochs than its config asks for was stopped by the scheduler and is
  told ``PRUNED`` (Optuna then keeps the last intermediate value as its score, and TPE ranks
  it below finished trials); one that ran them all is ``COMPLETE`` with its final accuracy;
  one that errored for good is ``FAIL`` (at the end of the study, since ``--resume`` retries
  errored trials from their checkpoints).

The study lives in ``STUDY_DIR/optuna.db`` (SQLite), so ``optuna.load_study`` and
optuna-dashboard open it. On ``--resume`` the searcher's pickled state (saved by Ray with the
experiment state) can lag the database by the trials asked or told after the last
experiment checkpoint; :meth:`StudySearch.restore` reconciles the two so every Ray trial ends
as exactly one Optuna trial.
"""

from __future__ import annotations

import logging
import math
import pickle
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from tune_cifar.spaces import DefineByRun, Space

logger = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)

METRIC = "val_acc"
RAY_TRIAL_ATTR = "ray_trial_id"
DB_NAME = "optuna.db"

_study_dir_override: Path | None = None


def storage_url(study_dir: Path) -> str:
    return f"sqlite:///{(Path(study_dir) / DB_NAME).resolve()}"


def relocate(study_dir: Path | None) -> None:
    """Point restored searchers at this study folder's database (the folder may have moved)."""
    global _study_dir_override
    _study_dir_override = Path(study_dir) if study_dir is not None else None


class StudySearch(OptunaSearch):
    """``OptunaSearch`` over a :class:`Space` with correct trial states and a persistent study."""

    def __init__(self, space: Space, study_dir: Path, study_name: str, seed: int = 0, max_concurrent: int = 0):
        self.study_dir = Path(study_dir)
        self.max_epochs = space.max_epochs
        # The limit lives here rather than in Ray's ConcurrencyLimiter, which drops the completion
        # of a trial that --resume retried after an error (it is no longer among its live trials).
        self.max_concurrent = max_concurrent
        self._epochs: dict[str, int] = {}  # Ray trial id -> last epoch reported to Optuna
        self._orphans: list[int] = []  # Optuna trial ids asked but never tied to a surviving Ray trial
        self._finished_before: set[str] = set()  # Ray trials already told in the database
        self._errored: set[str] = set()  # Ray trials that failed for good (so far): told FAIL at the end
        points = space.grid_points() or None
        super().__init__(
            space=DefineByRun(space, seed),
            metric=METRIC,
            mode="max",
            points_to_evaluate=points,
            sampler=optuna.samplers.TPESampler(seed=seed),
            study_name=study_name,
            storage=optuna.storages.RDBStorage(storage_url(self.study_dir)),
        )

    # -- asking ------------------------------------------------------------------------------
    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        live = sum(1 for ray_id in self._ot_trials if ray_id not in self._completed_trials)
        if self.max_concurrent and trial_id not in self._ot_trials and live >= self.max_concurrent:
            return None  # Ray asks again when a trial completes
        if trial_id not in self._ot_trials and self._orphans:
            # An earlier driver asked this trial, then died before Ray's state recorded it:
            # hand it to the next Ray trial (its sampled values are reused) instead of leaving
            # a trial RUNNING forever in the database.
            self._ot_trials[trial_id] = optuna.Trial(self._ot_study, self._orphans.pop(0))
        config = super().suggest(trial_id)
        if config is not None:
            self._ot_trials[trial_id].set_user_attr(RAY_TRIAL_ATTR, trial_id)
        return config

    # -- telling ----------------------------------------------------------------------------
    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self._report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        if trial_id in self._finished_before:
            self._completed_trials.add(trial_id)
            return  # told by the driver that died; the resumed run repeats the same epochs
        ot_trial = self._ot_trials[trial_id]
        if result:
            self._report(trial_id, result)  # Ray withholds the result it stopped the trial on
        self._completed_trials.add(trial_id)
        if error:
            # Not told yet: --resume retries errored trials from their checkpoints, and a told
            # trial cannot change state. finish_study() fails whatever is still errored at the end.
            self._errored.add(trial_id)
            ot_trial.set_user_attr("stop_reason", "error")
            return
        epochs_run = self._epochs.get(trial_id, 0)
        target = int((result or {}).get("config/epochs") or self.max_epochs)
        value = None
        if epochs_run == 0:
            state, reason = TrialState.FAIL, "never reported"
        elif epochs_run < target:
            state, reason = TrialState.PRUNED, "asha"
        else:
            state, reason = TrialState.COMPLETE, "completed"
            # the final model's accuracy (the SWA average when swa_epochs > 0), else the last epoch's
            summary = (result or {}).get("trial") or {}
            value = _finite((result or {}).get("trial/final_val_acc", summary.get("final_val_acc")))
            value = value if value is not None else _finite((result or {}).get(METRIC))
            if value is None:
                state, reason = TrialState.FAIL, "no finite val_acc"
        ot_trial.set_user_attr("stop_reason", reason)
        ot_trial.set_user_attr("epochs_run", epochs_run)
        self._ot_study.tell(ot_trial, value, state=state, skip_if_finished=True)

    def _report(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id not in self._ot_trials or trial_id in self._completed_trials or trial_id in self._finished_before:
            return
        epoch = int(result.get("epoch") or result.get("training_iteration") or 0)
        value = _finite(result.get(METRIC))
        if epoch < 1 or value is None:
            return
        if epoch > self._epochs.get(trial_id, 0):
            self._ot_trials[trial_id].report(value, epoch)  # a repeated epoch (after a retry) keeps the first value
        self._epochs[trial_id] = epoch

    # -- persistence -------------------------------------------------------------------------
    # Ray pickles the searcher twice: whole into tuner.pkl when the Tuner is built, and its
    # __dict__ into the searcher state with every experiment checkpoint. Neither copy holds
    # the Optuna study: the database is the study, and it is reopened (from the current study
    # folder, see relocate) on the way back.

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_ot_study"] = None
        state["_storage"] = None
        state["_ot_trials"] = {ray_id: trial._trial_id for ray_id, trial in self._ot_trials.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reopen()

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__getstate__(), file)

    def restore(self, checkpoint_path: str) -> None:
        """Load Ray's saved state, then reconcile it with the database (which may be ahead of it)."""
        with open(checkpoint_path, "rb") as file:
            self.__dict__.update(pickle.load(file))
        self._reopen()
        ids = {ray_id: trial._trial_id for ray_id, trial in self._ot_trials.items()}
        by_id = {t._trial_id: t for t in self._ot_study.get_trials(deepcopy=False)}
        known = set(ids.values())
        self._orphans = sorted(i for i, t in by_id.items() if t.state == TrialState.RUNNING and i not in known)
        self._finished_before = {
            ray_id
            for ray_id, ot_id in ids.items()
            if ray_id not in self._completed_trials and by_id[ot_id].state.is_finished()
        }
        for ray_id, ot_id in ids.items():
            self._epochs[ray_id] = max(by_id[ot_id].intermediate_values, default=0)
        for ray_id in list(self._errored):  # resumed from its checkpoint: it will report again
            self._errored.discard(ray_id)
            self._completed_trials.discard(ray_id)
        if self._orphans or self._finished_before:
            logger.info(
                "resume: reusing %d Optuna trials asked after the last checkpoint; %d already told stay as they are",
                len(self._orphans),
                len(self._finished_before),
            )

    def _reopen(self) -> None:
        if _study_dir_override is not None:
            self.study_dir = _study_dir_override
        ids: dict[str, int] = {
            ray_id: trial if isinstance(trial, int) else trial._trial_id for ray_id, trial in self._ot_trials.items()
        }
        if not (self.study_dir / DB_NAME).is_file():
            return  # not here (moved?): restore() runs again once the driver has called relocate()
        self._storage = optuna.storages.RDBStorage(storage_url(self.study_dir))
        self._ot_study = optuna.load_study(
            study_name=self._study_name, storage=self._storage, sampler=self._sampler, pruner=optuna.pruners.NopPruner()
        )
        self._ot_trials = {ray_id: optuna.Trial(self._ot_study, ot_id) for ray_id, ot_id in ids.items()}


def finish_study(study_dir: Path, study_name: str) -> int:
    """After a study ran to its end: tell FAIL for trials still RUNNING in the database (errored
    for good, or asked by a driver that died and never used). Returns how many."""
    study = optuna.load_study(study_name=study_name, storage=storage_url(study_dir))
    running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    for trial in running:
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
    return len(running)


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
