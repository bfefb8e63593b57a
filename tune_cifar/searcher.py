"""Optuna TPE behind Ray Tune, through Optuna's ask-and-tell API, with ASHA-stopped trials PRUNED.

Ray's own ``OptunaSearch`` (2.60) tells Optuna that a trial ASHA stopped after 5 of 100
epochs is COMPLETE with its 5-epoch score, so TPE learns low-budget scores as if they were
final and keeps proposing configurations that merely start fast. :class:`StudySearch` is a
plain Ray ``Searcher`` that owns the Optuna side instead:

* ``suggest`` asks Optuna for a trial and samples the space define-by-run
  (:class:`~tune_cifar.spaces.DefineByRun`: a child key only when its parent activates it);
* every epoch's ``val_acc`` is an intermediate value (``trial.report(value, epoch)``, written by a
  helper process: :class:`tune_cifar.optuna_db.ReportWriter`), including the last one before a
  stop (Ray does not pass that one to ``on_trial_result``);
* a trial that ends is told its outcome's Optuna state (:func:`tune_cifar.outcome.decide`; by
  the same helper, after the trial's reports, and waited for before the next ``ask``):
  ``COMPLETE`` with its final accuracy when it ran every epoch, ``PRUNED`` when ASHA stopped it
  (Optuna keeps the last intermediate value, and TPE ranks it below finished trials); one that
  errored for good is ``FAIL`` at the end of the study (``--resume`` retries errored trials from
  their checkpoints, and a told trial cannot change state).

It also holds the concurrency limit (Ray's ConcurrencyLimiter drops the completion of a trial
that ``--resume`` retried after an error). The study lives in ``STUDY/optuna.db``. On
``--resume`` the searcher's pickled state (saved by Ray with the experiment state) can lag the
database by the trials asked or told after the last experiment checkpoint; :meth:`restore`
reconciles the two so every Ray trial ends as exactly one Optuna trial.
"""

from __future__ import annotations

import logging
import math
import pickle
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher, SearchGenerator

from tune_cifar import private_api
from tune_cifar.optuna_db import ReportWriter, open_database
from tune_cifar.outcome import Outcome, decide
from tune_cifar.report import EpochReport
from tune_cifar.spaces import DefineByRun, Space
from tune_cifar.study_folder import StudyContext

logger = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)

METRIC = "val_acc"
RAY_TRIAL_ATTR = "ray_trial_id"


class StudySearch(Searcher):
    """TPE over a :class:`Space`, told PRUNED/COMPLETE/FAIL correctly, persisted in the study folder."""

    def __init__(self, space: Space, study: StudyContext, seed: int = 0, max_concurrent: int = 0):
        super().__init__(metric=METRIC, mode="max")
        self.study = study
        self.sample = DefineByRun(space, seed)
        self.max_concurrent = max_concurrent  # 0: as many as Ray can place
        self.sampler = optuna.samplers.TPESampler(seed=seed)  # pickled with the state: its RNG resumes
        self.optuna_ids: dict[str, int] = {}  # Ray trial id -> Optuna trial id (in optuna.db)
        self.completed: set[str] = set()  # Ray trials Ray has completed (told, or errored for now)
        self.epochs: dict[str, int] = {}  # Ray trial id -> last epoch reported to Optuna
        self.targets: dict[str, int] = {}  # Ray trial id -> the epochs its config asks for
        self.orphans: list[int] = []  # Optuna trials asked but never tied to a surviving Ray trial
        self.finished_before: set[str] = set()  # Ray trials already told in the database
        self.errored: set[str] = set()  # Ray trials that failed (so far): told FAIL at the end
        self._optuna = optuna.create_study(
            storage=open_database(study.folder),
            sampler=self.sampler,
            pruner=optuna.pruners.NopPruner(),
            study_name=study.name,
            direction="maximize",
            load_if_exists=True,
        )
        for point in space.grid_points():
            self._optuna.enqueue_trial(point)
        self._trials: dict[str, optuna.Trial] = {}
        self._reports = ReportWriter(study.folder, study.name)  # reports and tells, by a helper process

    # -- asking ------------------------------------------------------------------------------
    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if trial_id not in self.optuna_ids:
            live = len(set(self.optuna_ids) - self.completed)
            if self.max_concurrent and live >= self.max_concurrent:
                return None  # Ray asks again when a trial completes
            # An earlier driver may have asked a trial, then died before Ray's state recorded it:
            # the next Ray trial takes it over (its sampled values are reused) rather than leaving
            # it RUNNING forever in the database.
            orphan = self.orphans.pop(0) if self.orphans else None
            self._reports.sync()  # TPE proposes from every trial told so far (and --seed reproduces)
            trial = self._optuna.ask() if orphan is None else private_api.optuna_trial(self._optuna, orphan)
            trial.set_user_attr(RAY_TRIAL_ATTR, trial_id)
            self.optuna_ids[trial_id] = private_api.optuna_trial_id(trial)
            self._trials[trial_id] = trial
        config = self.sample(self._trial(trial_id))
        self.targets[trial_id] = int(config["epochs"])
        return config

    # -- telling ----------------------------------------------------------------------------
    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self._report(trial_id, EpochReport.from_result(result))

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id in self.completed or trial_id not in self.optuna_ids:
            return
        if trial_id in self.finished_before:
            self.completed.add(trial_id)
            return  # told by the driver that died; the resumed run repeats the same epochs
        report = EpochReport.from_result(result or {})
        self._report(trial_id, report)  # Ray withholds the result it stopped the trial on
        self.completed.add(trial_id)
        epochs_run = self.epochs.get(trial_id, 0)
        ended = decide(epochs_run, self.targets[trial_id], error=error, last_train_loss=report.epoch.get("train_loss"))
        optuna_id = self.optuna_ids[trial_id]
        if ended is Outcome.ERROR:
            self.errored.add(trial_id)  # told FAIL when the study ends, unless a --resume retries it
            self._reports.tell(optuna_id, {"stop_reason": ended.stop_reason}, None, None)
            return
        state, value, reason = self._told(ended, epochs_run, report)
        # by the helper, after the trial's reports (a PRUNED trial's value is its last one)
        self._reports.tell(optuna_id, {"stop_reason": reason, "epochs_run": epochs_run}, state, value)

    @staticmethod
    def _told(ended: Outcome, epochs_run: int, report: EpochReport) -> tuple[TrialState, float | None, str]:
        """What Optuna is told for an outcome: its state, a value for COMPLETE, the stop_reason
        attribute. A trial without an epoch or a finite value cannot be COMPLETE: FAIL, saying why."""
        if epochs_run == 0:
            return TrialState.FAIL, None, "never reported"
        if ended is not Outcome.COMPLETED:
            return TrialState[ended.optuna_state], None, ended.stop_reason
        # the final model's accuracy (the SWA average when swa_epochs > 0), else the last epoch's
        value = _finite(report.trial.get("final_val_acc"))
        value = value if value is not None else _finite(report.epoch.get(METRIC))
        if value is None:
            return TrialState.FAIL, None, "no finite val_acc"
        return TrialState.COMPLETE, value, ended.stop_reason

    def _report(self, trial_id: str, report: EpochReport) -> None:
        if trial_id in self.completed or trial_id in self.finished_before or trial_id not in self.optuna_ids:
            return
        epoch = int(report.epoch.get("epoch") or 0)
        value = _finite(report.epoch.get(METRIC))
        if epoch < 1 or value is None:
            return
        if epoch > self.epochs.get(trial_id, 0):
            # only an epoch past the last one reported: a repeated epoch (a retry) keeps its first value
            self._reports.report(self.optuna_ids[trial_id], epoch, value)
        self.epochs[trial_id] = epoch

    def _trial(self, trial_id: str) -> optuna.Trial:
        if trial_id not in self._trials:
            self._trials[trial_id] = private_api.optuna_trial(self._optuna, self.optuna_ids[trial_id])
        return self._trials[trial_id]

    # -- persistence -------------------------------------------------------------------------
    # Ray pickles the searcher twice: whole into tuner.pkl when the Tuner is built, and through
    # save() with every experiment checkpoint. Neither copy holds the Optuna study: the database
    # is the study, reopened from the study context (the resuming driver's folder) on the way back.

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_optuna": None, "_trials": {}, "_reports": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reopen()

    def save(self, checkpoint_path: str) -> None:
        self._reports.sync()  # the database holds at least what the saved state says was reported
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__getstate__(), file)

    def restore(self, checkpoint_path: str) -> None:
        """Load Ray's saved state, then reconcile it with the database (which may be ahead of it)."""
        with open(checkpoint_path, "rb") as file:
            self.__setstate__(pickle.load(file))
        by_id = {private_api.optuna_trial_id(t): t for t in self._optuna.get_trials(deepcopy=False)}
        known = set(self.optuna_ids.values())
        self.orphans = sorted(i for i, t in by_id.items() if t.state == TrialState.RUNNING and i not in known)
        # Errored trials are retried from their checkpoints and report again, unless the database
        # already closed them (a finished study told them FAIL, and --resume --num-samples grew it).
        self.completed -= self.errored
        self.errored.clear()
        self.finished_before = {
            ray_id
            for ray_id, optuna_id in self.optuna_ids.items()
            if ray_id not in self.completed and by_id[optuna_id].state.is_finished()
        }
        for ray_id, optuna_id in self.optuna_ids.items():
            self.epochs[ray_id] = max(by_id[optuna_id].intermediate_values, default=0)
        if self.orphans or self.finished_before:
            logger.info(
                "resume: reusing %d Optuna trials asked after the last checkpoint; %d already told stay as they are",
                len(self.orphans),
                len(self.finished_before),
            )

    def _reopen(self) -> None:
        self._trials = {}
        self._reports = ReportWriter(self.study.folder, self.study.name)
        if not self.study.folder.optuna_db.is_file():
            return  # unpickled outside a driver (the database is elsewhere): nothing to reopen
        self._optuna = optuna.load_study(
            study_name=self.study.name,
            storage=open_database(self.study.folder),
            sampler=self.sampler,
            pruner=optuna.pruners.NopPruner(),
        )


class StudyTrials(SearchGenerator):
    """Ray's trial generator around :class:`StudySearch`, creating as many trials as the study has.

    Ray restores the generator's trial count from the experiment state, which would freeze a
    study at its first size; here the count comes from the study context, so that
    ``--resume --num-samples N`` adds trials (TPE continues from the database, ASHA from its rungs).
    """

    def add_configurations(self, experiments: Any) -> None:
        super().add_configurations(experiments)
        private_api.set_trial_count(self, self.searcher.study.num_samples)

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        private_api.set_trial_count(self, self.searcher.study.num_samples)


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
