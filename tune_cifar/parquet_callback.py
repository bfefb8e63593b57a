"""The study's Parquet tables, written by the driver as results arrive, and rebuilt on resume.

The callback runs in the driver, on results Ray has already collected, so a trial never writes
shared files itself: one process owns every part file, and the tables are as complete as
Ray's own record of the study. Rows are keyed by ``(trial_id, epoch)`` and every epoch a
trial reports replaces that epoch and drops any later ones, so a trial retried from an older
checkpoint, or continued by ``--resume``, neither loses nor duplicates rows.

The files are written outside Ray Tune's event loop, which every trial's results pass through:
the loop only notes what changed; a thread of the driver's takes whatever changed since its
last round (every trial's reports since, one file per table however many there are: when
reports come faster than the disk takes them, rounds grow instead of falling behind) and hands
it to a process of its own, which turns the rows into Parquet and writes them, and waits for it.
Encoding Parquet in the driver's interpreter took turns with Ray Tune's loop for it
(``benchmarks/driver_throughput.py`` measures both).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
from pyarrow.dataset import dataset
from ray import tune

from tune_cifar import tables
from tune_cifar.errors import UsageError
from tune_cifar.helper_process import HelperProcess
from tune_cifar.outcome import Outcome
from tune_cifar.ray_trial import error_line, hyperparameter_row, outcome
from tune_cifar.report import EpochReport
from tune_cifar.study_folder import StudyContext, StudyFolder, part_trial
from tune_cifar.tables import TableWriter, TrialRecord

logger = logging.getLogger(__name__)

# The shortest time between the starts of two writer rounds. A round's cost is mostly per file
# (opening, encoding, fsync: about 5 ms for its three or four files here), so rounds as fast as the
# disk allows, each holding a report or two, spent a core's worth of CPU beside Ray Tune's loop;
# paced, a round holds every report of its quarter second, and a row reaches the disk within
# about that much more (benchmarks/driver_throughput.py).
ROUND_SECONDS = 0.25


class ParquetCallback(tune.Callback):
    """Writes ``trials``, ``epochs``, ``layers`` and ``steps`` under the study folder as results arrive."""

    def __init__(self, study: StudyContext):
        self.study = study  # restored by --resume as the resuming driver's (see tune_cifar.study_folder)
        self._tables: TableWriter | None = None  # opened at the first change, where earlier drivers left the folder
        self._lock = threading.Condition()  # guards _tables and _changed, between Tune's loop and the writer
        self._changed = False  # changes the writer has not taken yet
        self._writer: threading.Thread | None = None
        self._encoder: HelperProcess | None = None  # encodes and writes the files (tables.serve_writes)
        self._closing = False
        self._failure: Exception | None = None  # a writer's error that is not the disk's: raised in Tune's loop

    def __getstate__(self) -> dict[str, Any]:  # the records, lock, thread and process stay with this driver
        return {**self.__dict__, "_tables": None, "_lock": None, "_changed": False, "_writer": None,
                "_encoder": None, "_closing": False, "_failure": None}  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Condition()

    @property
    def tables(self) -> TableWriter:
        """The folder's writer; after --resume the earlier driver's rows are the starting point."""
        if self._tables is None:
            self._tables = TableWriter.open(self.study.folder.path)
        return self._tables

    def record(self, trial: Any) -> TrialRecord:
        return self.tables.record(trial.trial_id)

    def _update(self, trial: Any, report: EpochReport | None = None, drop_after: int | None = None,
                **fields: Any) -> None:  # fmt: skip
        """Add ``report``'s rows (after dropping epochs past ``drop_after``) and ``fields`` to the trial's
        row, and hand the change to the writer thread."""
        if self._failure is not None:
            raise self._failure
        base = {"study": self.study.name, **hyperparameter_row(trial)}  # Ray's config: over what the disk says
        with self._lock:
            record = self.record(trial)
            if drop_after is not None:
                record.drop_after(drop_after)
            if report is not None:
                record.add("epochs", [report.epoch])
                record.add("layers", report.layers)
                record.add("steps", report.steps)
            record.trial = {**record.trial, **base, **fields}
            self._hand_over()

    def forget_epochs(self, trial: Any) -> None:
        """Take every epoch of the trial off disk (at the next round): a rebuild replays them."""
        with self._lock:
            self.record(trial).drop_after(0)
            self._hand_over()

    def _hand_over(self) -> None:
        """Tell the writer thread (started if it is not running) that records changed; under the lock."""
        self._changed = True
        if self._writer is None:
            self._closing = False
            self._writer = threading.Thread(target=self._write_changes, name="parquet", daemon=True)
            self._writer.start()
        self._lock.notify()

    def _write_changes(self) -> None:
        """The writer thread: each round takes every changed trial's writes, then makes them, and
        the next round starts ROUND_SECONDS after this one at the earliest (unless the study is
        closing): reports that come fast share a round instead of each costing one. Once a write
        failed (a full disk) nothing more is written: the study is stopping, --resume rebuilds."""
        while True:
            with self._lock:
                while not self._changed and not self._closing:
                    self._lock.wait()
                if not self._changed:
                    return
                try:
                    ops = self.tables.changes()
                except Exception as exc:  # a bug: raised in Tune's loop at the next result, not lost with the thread
                    self._failure = exc
                    return
                self._changed = False
            started = time.monotonic()
            self._write(ops)
            if self._failure is not None:
                return
            with self._lock:
                self._lock.wait_for(lambda: self._closing, timeout=ROUND_SECONDS - (time.monotonic() - started))

    def _write(self, ops: list[tables.Write]) -> None:
        """One round's writes, by the helper process (a disk's error stops the study, anything else
        is raised in Tune's loop at the next result)."""
        if self.study.write_failures:
            return
        try:
            if self._encoder is None:  # a failure to start it is not the disk's
                self._encoder = HelperProcess("tune_cifar.tables:serve_writes")
        except Exception as exc:
            self._failure = exc
            return
        try:
            self._encoder.call((self.study.folder.path, ops))
        except OSError as exc:
            self.study.stop_on_write_failure(exc)
        except Exception as exc:  # a bug, not the disk: fail the study loudly, as a write in the loop would
            self._failure = exc

    def close(self) -> None:
        """Flush, then end the writer process (the next change starts another)."""
        try:
            self.flush()
        finally:
            if self._encoder is not None:
                self._encoder.close()
                self._encoder = None

    def flush(self) -> None:
        """Wait until everything reported so far is on disk (the writer thread ends; the next change
        starts another)."""
        with self._lock:
            writer, self._writer = self._writer, None
            self._closing = True
            self._lock.notify()
        if writer is not None:
            writer.join()
        if self._failure is not None:
            raise self._failure

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, **Outcome.RUNNING.columns())

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        report = EpochReport.from_result(result)
        # a retried trial redoes the epochs after its checkpoint
        self._update(trial, report, drop_after=int(report.epoch["epoch"]) - 1, **report.trial,
                     **Outcome.RUNNING.columns(), wall_s=result.get("time_total_s"))  # fmt: skip

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = int((trial.last_result or {}).get("epoch") or 0)
        self._update(trial, drop_after=last, status=Outcome.RUNNING.status,
                     stop_reason=f"retrying: {error_line(trial)}")  # fmt: skip

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, **outcome(trial).columns())

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, **outcome(trial, error=True).columns(error_line(trial)))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial in trials:  # left running when the driver stopped: --resume continues them
            record = self.tables.records.get(trial.trial_id)
            if record is not None and record.trial.get("status") == Outcome.RUNNING.status:
                self._update(trial, **outcome(trial, ended=False, interrupted=True).columns())
        try:
            self.flush()
            if not self.study.write_failures:
                known = {trial.trial_id for trial in trials}
                try:
                    self.tables.compact(known)
                except OSError as exc:  # the round files stay whole; the next --resume merges them
                    self.study.stop_on_write_failure(exc)
                else:
                    self.remove_orphans(known)
        finally:
            self.close()

    def remove_orphans(self, known: set[str]) -> list[str]:
        """Delete part files of trials Ray no longer knows: started by a driver that died before
        its experiment state recorded them; a resumed study redoes that work under new ids (their
        rows in round files went with the merge)."""
        removed = []
        for name in tables.TABLES:
            for part in self.study.folder.parts(name):
                trial_id = part_trial(part)
                if trial_id not in known:
                    part.unlink()
                    removed.append(trial_id)
        if removed:
            logger.info("removed rows of %d trials lost with an earlier driver", len(set(removed)))
        return sorted(set(removed))


def repair_tables(study: StudyContext) -> list[str]:
    """Before a resume: make the tables hold what Ray's saved state says was reported, by replaying
    a trial's saved results (``trial_*/result.json``) through :class:`ParquetCallback`, the same
    code that wrote them. Two cases: a damaged file is set aside (``STUDY/damaged/``) and its trials
    rebuilt (a damaged round or live file held rows of trials it cannot name: every trial); and,
    when the last driver left round files unmerged (killed, or stopped by a failed write), a trial
    whose rows fall short of Ray's state is rebuilt: its last epoch Ray knows missing from a table
    that epoch has rows in (the writer's last round never reached the disk, and Ray will not replay
    that epoch), or Ray finished it while its row says RUNNING. A driver that merged its rounds
    flushed every row first, so then nothing is read. Returns one line per damaged file and one
    for the trials that fell short, saying what was done."""
    folder = study.folder
    damaged = tables.damaged_parts(folder.path)
    if not damaged and not any(folder.rounds(name) for name in tables.PER_EPOCH_KEYS):
        return []
    from ray.tune import ExperimentAnalysis

    try:
        ray_trials = ExperimentAnalysis(str(folder.path)).trials
    except Exception as exc:  # Ray's saved state cut short (a full disk): Ray's restore decides what it takes
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if damaged:
            raise UsageError(f"{damaged[0]}: damaged, and Ray's saved state cannot be read to rebuild it ({why}); "
                             "move the damaged file away to resume without its rows") from None  # fmt: skip
        return [f"tables not checked against Ray's saved state: it cannot be read ({why})"]
    own = [part for part in damaged if part.name.startswith("part-")]
    everyone = len(own) < len(damaged)
    lost = {part_trial(part) for part in own}
    behind = set() if everyone else _behind(folder, ray_trials, damaged) - lost
    rebuilding = [t for t in ray_trials if everyone or t.trial_id in lost or t.trial_id in behind]
    # every trial's results read before anything moves: a failure here leaves the folder as it was
    results = {t.trial_id: _saved_results(folder.trial_dir(t.trial_id) / "result.json") for t in rebuilding}
    aside = folder.damaged
    for part in damaged:
        (aside / part.parent.name).mkdir(parents=True, exist_ok=True)
        part.replace(aside / part.parent.name / part.name)
    writer = ParquetCallback(study)
    rebuilt = set()
    for trial in rebuilding:
        if results[trial.trial_id] is None:
            continue
        writer.forget_epochs(trial)  # every table of the trial is rewritten from the replay
        for result in results.pop(trial.trial_id):
            writer.on_trial_result(0, [], trial, result)
        if trial.status == "TERMINATED":
            writer.on_trial_complete(0, [], trial)
        elif trial.status == "ERROR":
            writer.on_trial_error(0, [], trial)
        rebuilt.add(trial.trial_id)
    writer.close()

    def done(part: Path) -> str:
        if part not in own:
            return f"{len(rebuilt)} trials rebuilt from Ray's results"
        return "rebuilt from Ray's results" if part_trial(part) in rebuilt else "not rebuilt (no results)"

    lines = [f"{part}: damaged; set aside in {aside} and {done(part)}" for part in damaged]
    if behind:
        lines.append(f"rows behind Ray's saved state (a driver stopped before its last writes): {len(behind)} "
                     "trials rebuilt from Ray's results")  # fmt: skip
    return lines


def _saved_results(path: Path) -> list[dict[str, Any]] | None:
    """A trial's results as Ray's JSON logger saved them, in order (None: no file). A line cut
    short (the driver killed while Ray wrote it) ends them, with a warning."""
    if not path.is_file():
        return None
    results = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            results.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s: line %d is not whole JSON; replaying the %d results before it", path, number,
                           len(results))  # fmt: skip
            break
    return results


def _behind(folder: StudyFolder, ray_trials: list[Any], damaged: list[Path]) -> set[str]:
    """Trials whose last epoch in Ray's saved state (``trial.last_result``) is missing from a table
    it has rows in, or that Ray finished while their ``trials`` row says RUNNING (or they have
    none). Rounds are written in order, so an epoch on disk means the ones before it are too."""

    def read(name: str, columns: list[str]) -> pa.Table:  # the table's whole files only
        whole = [str(path) for path in folder.files(name) if path not in damaged]
        return dataset(whole, schema=tables.SCHEMAS[name], format="parquet").to_table(columns=columns)

    latest: dict[str, dict[str, int]] = {}  # table -> trial id -> its last epoch on disk
    for name in tables.PER_EPOCH_KEYS:
        last = read(name, ["trial_id", "epoch"]).group_by("trial_id").aggregate([("epoch", "max")]).to_pydict()
        latest[name] = dict(zip(last["trial_id"], last["epoch_max"], strict=True))
    rows = read("trials", ["trial_id", "status"]).to_pydict()
    status = dict(zip(rows["trial_id"], rows["status"], strict=True))
    behind = set()
    for trial in ray_trials:
        report = EpochReport.from_result(trial.last_result or {})
        epoch = int(report.epoch.get("epoch") or 0)
        if epoch < 1:
            continue  # never reported: nothing of it to lose
        shown = {"epochs": [report.epoch], "layers": report.layers, "steps": report.steps}
        missing = any(rows and latest[name].get(trial.trial_id, 0) < epoch for name, rows in shown.items())
        finished = trial.status in ("TERMINATED", "ERROR") and status.get(trial.trial_id) in (None, "RUNNING")
        if missing or finished:
            behind.add(trial.trial_id)
    return behind
