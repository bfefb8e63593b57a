"""The study's Parquet tables, written by the driver as results arrive, and rebuilt on resume.

The callback runs in the driver, on results Ray has already collected, so a trial never writes
shared files itself: one process owns every part file, and the tables are as complete as
Ray's own record of the study. Rows are keyed by ``(trial_id, epoch)`` and every epoch a
trial reports replaces that epoch and drops any later ones, so a trial retried from an older
checkpoint, or continued by ``--resume``, neither loses nor duplicates rows.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ray import tune

from tune_cifar import tables
from tune_cifar.outcome import Outcome
from tune_cifar.ray_trial import error_line, hyperparameter_row, outcome
from tune_cifar.report import EpochReport
from tune_cifar.study_folder import StudyContext
from tune_cifar.tables import TrialRecord

logger = logging.getLogger(__name__)


class ParquetCallback(tune.Callback):
    """Writes ``trials``, ``epochs``, ``layers`` and ``steps`` under the study folder as results arrive."""

    def __init__(self, study: StudyContext):
        self.study = study  # restored by --resume as the resuming driver's (see tune_cifar.study_folder)
        self.records: dict[str, TrialRecord] = {}

    def record(self, trial: Any) -> TrialRecord:
        if trial.trial_id not in self.records:
            # After --resume the earlier driver's rows are the starting point.
            self.records[trial.trial_id] = TrialRecord.load(self.study.folder.path, trial.trial_id)
        return self.records[trial.trial_id]

    def _update(self, trial: Any, **fields: Any) -> TrialRecord:
        """The trial's row with ``fields``, written with its per-epoch rows. Once a write failed
        (a full disk) nothing more is written: the study is stopping, and --resume rebuilds."""
        record = self.record(trial)
        base = {"study": self.study.name, **hyperparameter_row(trial)}
        record.trial = {**base, **record.trial, **fields}
        if not self.study.write_failures:
            try:
                record.write(self.study.folder.path)
            except OSError as exc:
                self.study.stop_on_write_failure(exc)
        return record

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, **Outcome.RUNNING.columns())

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        report = EpochReport.from_result(result)
        record = self.record(trial)
        record.drop_after(int(report.epoch["epoch"]) - 1)  # a retried trial redoes the epochs after its checkpoint
        record.add("epochs", [report.epoch])
        record.add("layers", report.layers)
        record.add("steps", report.steps)
        self._update(trial, **report.trial, **Outcome.RUNNING.columns(), wall_s=result.get("time_total_s"))

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = int((trial.last_result or {}).get("epoch") or 0)
        self.record(trial).drop_after(last)
        self._update(trial, status=Outcome.RUNNING.status, stop_reason=f"retrying: {error_line(trial)}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, **outcome(trial).columns())

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, **outcome(trial, error=True).columns(error_line(trial)))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial in trials:  # left running when the driver stopped: --resume continues them
            record = self.records.get(trial.trial_id)
            if record is not None and record.trial.get("status") == Outcome.RUNNING.status:
                self._update(trial, **outcome(trial, ended=False, interrupted=True).columns())
        self.remove_orphans({trial.trial_id for trial in trials})

    def remove_orphans(self, known: set[str]) -> list[str]:
        """Delete part files of trials Ray no longer knows: started by a driver that died before
        its experiment state recorded them; a resumed study redoes that work under new ids."""
        removed = []
        for name in tables.TABLES:
            for part in self.study.folder.parts(name):
                trial_id = part.stem.removeprefix("part-")
                if trial_id not in known:
                    part.unlink()
                    removed.append(trial_id)
        if removed:
            logger.info("removed rows of %d trials lost with an earlier driver", len(set(removed)))
        return sorted(set(removed))


def repair_tables(study: StudyContext) -> list[str]:
    """Before a resume: set damaged part files aside (``STUDY/damaged/``) and rebuild their trials'
    rows by replaying Ray's saved results (``trial_*/result.json``) through :class:`ParquetCallback`,
    the same code that wrote them. Returns one line per damaged file, saying what was done."""
    folder = study.folder
    damaged = tables.damaged_parts(folder.path)
    if not damaged:
        return []
    from ray.tune import ExperimentAnalysis

    ray_trials = ExperimentAnalysis(str(folder.path)).trials  # loaded first: nothing moves if this fails
    aside = folder.damaged
    lost = {part.stem.removeprefix("part-") for part in damaged}
    for part in damaged:
        (aside / part.parent.name).mkdir(parents=True, exist_ok=True)
        part.replace(aside / part.parent.name / part.name)
    writer = ParquetCallback(study)
    rebuilt = set()
    for trial in ray_trials:
        results = folder.trial_dir(trial.trial_id) / "result.json"
        if trial.trial_id not in lost or not results.is_file():
            continue
        for name in tables.TABLES:  # every table of the trial is rewritten from the replay
            folder.part(name, trial.trial_id).unlink(missing_ok=True)
        writer.records[trial.trial_id] = TrialRecord(trial.trial_id)
        for line in results.read_text().splitlines():
            if line.strip():
                writer.on_trial_result(0, [], trial, json.loads(line))
        if trial.status == "TERMINATED":
            writer.on_trial_complete(0, [], trial)
        elif trial.status == "ERROR":
            writer.on_trial_error(0, [], trial)
        rebuilt.add(trial.trial_id)
    return [
        f"{part}: damaged; set aside in {aside} and "
        + ("rebuilt from Ray's results" if part.stem.removeprefix("part-") in rebuilt else "not rebuilt (no results)")
        for part in damaged
    ]
