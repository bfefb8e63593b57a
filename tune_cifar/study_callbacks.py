"""Driver-side Ray Tune callbacks: the Parquet tables, W&B runs and the console view of a study.

They run in the driver, on results Ray has already collected, so a trial never writes
shared files itself: one process owns every part file, and the tables are as complete as
Ray's own record of the study. Rows are keyed by ``(trial_id, epoch)`` and every epoch a
trial reports replaces that epoch and drops any later ones, so a trial retried from an older
checkpoint, or continued by ``--resume``, neither loses nor duplicates rows.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any

from ray import tune

from tune_cifar import config as cfg
from tune_cifar import tables
from tune_cifar.errors import UsageError
from tune_cifar.study_folder import StudyContext
from tune_cifar.tables import EpochReport, TrialRecord, finished_status

logger = logging.getLogger(__name__)


class _StudyCallback(tune.Callback):
    """A callback of one study. It writes to the study's folder through a :class:`StudyContext`,
    so that a callback ``--resume`` restored from Ray's state writes where the resuming driver says."""

    def __init__(self, study: StudyContext):
        self.study = study

    @property
    def study_dir(self) -> Path:
        return self.study.folder

    @property
    def study_name(self) -> str:
        return self.study.name


def hyperparameter_row(trial: Any) -> dict[str, Any]:
    """The trial's hyperparameter columns: every vocabulary key, inactive ones null.

    A configuration the vocabulary refuses (a sampled value the trial will fail on) is recorded
    as sampled, so that the trial shows up as an ERROR row instead of ending the whole study.
    """
    try:
        return cfg.to_row(cfg.from_values(trial.config, source=f"trial {trial.trial_id}"))
    except UsageError:
        raw = {key: trial.config.get(key) for key in cfg.KEYS}
        if isinstance(raw["filters"], (list, tuple)):
            raw["filters"] = cfg.format_filters(raw["filters"])
        return raw


def target_epochs(trial: Any) -> int:
    return int(trial.config.get("epochs", cfg.TrainConfig.epochs))


def error_line(trial: Any) -> str:
    """The last line of a trial's error (the exception), for the stop_reason column and the console."""
    text = ""
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        text = Path(path).read_text(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "unknown error")[:300]


class ParquetCallback(_StudyCallback):
    """Writes ``trials``, ``epochs``, ``layers`` and ``steps`` under the study folder as results arrive."""

    def __init__(self, study: StudyContext):
        super().__init__(study)
        self.records: dict[str, TrialRecord] = {}

    def record(self, trial: Any) -> TrialRecord:
        if trial.trial_id not in self.records:
            # After --resume the earlier driver's rows are the starting point.
            self.records[trial.trial_id] = TrialRecord.load(self.study_dir, trial.trial_id)
        return self.records[trial.trial_id]

    def _update(self, trial: Any, **fields: Any) -> TrialRecord:
        record = self.record(trial)
        base = {"study": self.study_name, **hyperparameter_row(trial)}
        record.trial = {**base, **record.trial, **fields}
        record.write(self.study_dir)
        return record

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, status="RUNNING", stop_reason=None)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        report = EpochReport.from_result(result)
        record = self.record(trial)
        record.drop_after(int(report.epoch["epoch"]) - 1)  # a retried trial redoes the epochs after its checkpoint
        record.add("epochs", [report.epoch])
        record.add("layers", report.layers)
        record.add("steps", report.steps)
        self._update(trial, **report.trial, status="RUNNING", stop_reason=None, wall_s=result.get("time_total_s"))

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = int((trial.last_result or {}).get("epoch") or 0)
        self.record(trial).drop_after(last)
        self._update(trial, status="RUNNING", stop_reason=f"retrying: {error_line(trial)}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        status = finished_status(int(self.record(trial).trial.get("epochs_run") or 0), target_epochs(trial))
        self._update(trial, status=status, stop_reason=tables.STOP_REASONS[status])

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, status="ERROR", stop_reason=f"error: {error_line(trial)}")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial in trials:
            record = self.records.get(trial.trial_id)
            if record is not None and record.trial.get("status") == "RUNNING":
                self._update(trial, stop_reason=tables.STOP_REASONS["RUNNING"])
        self.remove_orphans({trial.trial_id for trial in trials})

    def remove_orphans(self, known: set[str]) -> list[str]:
        """Delete part files of trials Ray no longer knows: started by a driver that died before
        its experiment state recorded them; a resumed study redoes that work under new ids."""
        removed = []
        for name in tables.TABLES:
            for part in (self.study_dir / name).glob("part-*.parquet"):
                trial_id = part.stem.removeprefix("part-")
                if trial_id not in known:
                    part.unlink()
                    removed.append(trial_id)
        if removed:
            logger.info("removed rows of %d trials lost with an earlier driver", len(set(removed)))
        return sorted(set(removed))


WANDB_CLOSE_TIMEOUT_S = 300  # how long the study's end waits for W&B to close its runs
# How a trial ended, in W&B's words beside the trials table's ``status`` (README: "One trial, four
# views"): a run tag to filter on in the W&B UI; the summary's ``status`` is the table's word itself.
WANDB_TAGS = {"TERMINATED": "completed", "STOPPED": "asha-stopped", "ERROR": "error", "RUNNING": "interrupted"}
# One chart series per tensor, keyed (layer_index, layer) so that sorting gives the forward order.
Flows = dict[tuple[int, str], dict[int, tuple[float | None, float | None]]]


class WandbCallback(_StudyCallback):
    """One W&B run per trial, grouped by study: config, per-epoch metrics, per-layer statistics and
    gradient health, and at the end gradient-flow and weight-update-flow charts (mean |g| and
    ||ΔW||/||W|| of every layer across epochs, in forward order), the first report's dashboard.
    Each run ends with the trials table's status in its summary and a tag (``WANDB_TAGS``): W&B
    itself calls an ASHA-stopped run "finished" like a completed one.

    W&B works in a thread of its own: opening a run takes most of a second, which in Ray's event
    loop would hold up every trial (``benchmarks/study_overhead.py`` measured it as the largest
    driver-side cost). The callbacks hand over copies of what they saw, in order; the experiment's
    end waits for the thread to finish every run.
    """

    def __init__(self, study: StudyContext, mode: str, project: str = "tune-cifar"):
        super().__init__(study)
        self.mode = mode
        self.project = project
        self.runs: dict[str, Any] = {}  # used by the W&B thread only
        self.flows: dict[str, Flows] = {}  # used by the W&B thread only
        self.open: set[str] = set()  # trials with a run, as the callbacks see it
        self.failed = False
        self._jobs: queue.Queue | None = None
        self._worker: threading.Thread | None = None

    def __getstate__(self) -> dict[str, Any]:  # open runs and the thread stay with this driver
        kept = {**self.__dict__, "runs": {}, "flows": {}, "open": set(), "failed": False}
        return kept | {"_jobs": None, "_worker": None}

    def _submit(self, action: Any, *args: Any) -> None:
        if self._worker is None:
            # W&B's caches and artifact staging (~/.cache/wandb, ~/.local/share/wandb) go into the
            # study folder, unless the user chose places for them.
            for variable, where in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"),
                                    ("WANDB_ARTIFACT_DIR", "artifacts")):  # fmt: skip
                os.environ.setdefault(variable, str(self.study_dir / "wandb" / where))
            self._jobs = queue.Queue()
            self._worker = threading.Thread(target=self._work, name="wandb", daemon=True)
            self._worker.start()
        self._jobs.put((action, args))

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            action, args = job
            self._guarded(action, *args)

    def _run(self, trial_id: str, config: dict[str, Any] | None) -> Any:
        if trial_id not in self.runs:
            import wandb

            run_id = re.sub(r"[^A-Za-z0-9_-]", "-", f"{self.study_name}-{trial_id}")[:120]
            self.runs[trial_id] = wandb.init(
                project=self.project,
                group=self.study_name,
                name=trial_id,
                id=run_id,
                resume="allow",
                job_type="trial",
                dir=str(self.study_dir),
                mode=self.mode,
                reinit="create_new",
                config=config,
                settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
            )
            self.runs[trial_id].define_metric("*", step_metric="epoch")
            self.flows[trial_id] = self._load_flows(trial_id)
        return self.runs[trial_id]

    def _load_flows(self, trial_id: str) -> Flows:
        """Per-layer history of a resumed trial, from the layers table the earlier driver wrote."""
        flows: Flows = {}
        for row in TrialRecord.load(self.study_dir, trial_id).rows["layers"].values():
            series = flows.setdefault((row["layer_index"], row["layer"]), {})
            series[row["epoch"]] = (row["grad_mean_abs"], row["update_ratio"])
        return flows

    def _guarded(self, action: Any, *args: Any) -> None:
        """W&B is a view of the study, not part of it: a W&B failure disables it, the study goes on."""
        if self.failed:
            return
        try:
            action(*args)
        except Exception as exc:
            self.failed = True
            print(f"warning: W&B logging stopped ({type(exc).__name__}: {str(exc)[:200]}); the study continues")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        config = None if trial.trial_id in self.open else hyperparameter_row(trial)  # for opening its run
        self.open.add(trial.trial_id)
        self._submit(self._log, trial.trial_id, config, EpochReport.from_result(result))

    def _log(self, trial_id: str, config: dict[str, Any] | None, report: EpochReport) -> None:
        run = self._run(trial_id, config)
        epoch = int(report.epoch["epoch"])
        metrics: dict[str, Any] = {key: value for key, value in report.epoch.items() if value is not None}
        for row in report.layers:
            layer = row["layer"]
            series = self.flows[trial_id].setdefault((row["layer_index"], layer), {})
            series[epoch] = (row["grad_mean_abs"], row["update_ratio"])
            for stat in ("grad_mean_abs", "update_ratio", "weight_l2"):
                if row.get(stat) is not None:
                    metrics[f"{stat}/{layer}"] = row[stat]
            if row.get("health") in tables.HEALTH_ORDER:
                # the layers table's judgement (telemetry.layer_health) as a number W&B can chart:
                # 0 ok, 1 vanishing, 2 exploding
                metrics[f"health/{layer}"] = tables.HEALTH_ORDER.index(row["health"])
        run.log(metrics)

    def _finish(self, trial_id: str, status: str, summary: dict[str, Any], stop_reason: str) -> None:
        """Charts, summary, tag, then close the run; ``status`` is the trials table's word for the trial."""
        run = self.runs.pop(trial_id, None)
        if run is None:
            return
        import wandb

        flows = self.flows.pop(trial_id, {})
        for index, title, key in ((0, "gradient flow: mean |g| per layer", "grad_flow"),
                                  (1, "weight-update flow: ||ΔW|| / ||W|| per layer", "update_flow")):  # fmt: skip
            layers = sorted(flows)  # (layer_index, layer): the forward order, input to output
            epochs = sorted({epoch for history in flows.values() for epoch in history})
            if not layers or not epochs:
                continue
            ys = [[flows[layer].get(epoch, (None, None))[index] for epoch in epochs] for layer in layers]
            names = [name for _, name in layers]
            run.log({key: wandb.plot.line_series(xs=epochs, ys=ys, keys=names, title=title, xname="epoch")})
        run.summary.update(
            {key: value for key, value in summary.items() if value is not None}
            | {"status": status, "stop_reason": stop_reason}
        )
        # a resumed run keeps its earlier tags: replace the outcome, keep anything else
        run.tags = (*(tag for tag in run.tags if tag not in WANDB_TAGS.values()), WANDB_TAGS[status])
        run.finish(exit_code=1 if status == "ERROR" else 0)  # W&B's own state: failed for an error

    def _close(self, trial: Any, status: str) -> None:
        """Hand the W&B thread what closing ``trial``'s run needs, read now (Ray's trial changes later)."""
        if trial.trial_id not in self.open:
            return
        self.open.discard(trial.trial_id)
        summary = EpochReport.from_result(trial.last_result or {}).trial
        stop_reason = tables.STOP_REASONS.get(status) or f"error: {error_line(trial)}"
        self._submit(self._finish, trial.trial_id, status, summary, stop_reason)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # the ParquetCallback's rule (tables.finished_status), on the epochs the trial reported
        epochs_run = EpochReport.from_result(trial.last_result or {}).trial.get("epochs_run") or _epochs_run(trial)
        self._close(trial, finished_status(int(epochs_run), target_epochs(trial)))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "ERROR")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial in trials:  # runs still open: the trial did not finish (RUNNING, stop_reason interrupted)
            self._close(trial, "RUNNING")
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join(timeout=WANDB_CLOSE_TIMEOUT_S)
            if self._worker.is_alive():  # e.g. an online W&B that stopped answering: the study is done
                print(f"warning: W&B runs still closing after {WANDB_CLOSE_TIMEOUT_S} s; not waiting any longer")
            self._worker = None


class ConsoleCallback(tune.Callback):
    """A compact progress line instead of Ray's trial table: counts, best so far, epochs, ETA."""

    def __init__(self, study: StudyContext, max_epochs: int, interval_s: float = 15.0):
        self.study = study  # its num_samples: the study's size, raised by --resume --num-samples
        self.max_epochs = max_epochs
        self.interval_s = interval_s
        self.started = time.monotonic()
        self.last_print = 0.0
        self.best: tuple[float, str, int] | None = None
        self.epoch_seconds: list[float] = []

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "best": None, "epoch_seconds": []}

    def setup(self, **info: Any) -> None:
        self.started = time.monotonic()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get("seconds"):
            self.epoch_seconds.append(float(result["seconds"]))
        value = result.get("val_acc")
        if value is not None and (self.best is None or value > self.best[0]):
            self.best = (float(value), trial.trial_id, int(result["epoch"]))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"trial {trial.trial_id} failed: {error_line(trial)}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.last_print = 0.0  # show completions promptly

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if now - self.last_print >= self.interval_s:
            self.last_print = now
            self._show(self.line(trials))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # The last trial's completion resets the timer, so the step after it has usually printed
        # this very state already: the final line is shown once, not twice.
        line = self.line(trials)
        if _state(line) != self.last_state:
            self._show(line)

    # What the last printed line said, clock aside; a class default keeps callbacks pickled by an
    # older driver (restored by --resume) working.
    last_state: str | None = None

    def _show(self, line: str) -> None:
        self.last_state = _state(line)
        print(line, flush=True)

    def line(self, trials: list) -> str:
        counts: dict[str, int] = {}
        for trial in trials:
            counts[trial.status] = counts.get(trial.status, 0) + 1
        ended = [t for t in trials if t.status == "TERMINATED"]
        stopped = sum(1 for t in ended if finished_status(_epochs_run(t), target_epochs(t)) == "STOPPED")
        done = counts.get("TERMINATED", 0)
        running = counts.get("RUNNING", 0)
        unstarted = max(self.study.num_samples - len(trials), 0) + counts.get("PENDING", 0) + counts.get("PAUSED", 0)
        parts = [
            f"[{_clock(time.monotonic() - self.started)}] {running} running, {unstarted} pending,"
            f" {done - stopped} finished, {stopped} stopped by ASHA, {counts.get('ERROR', 0)} errors",
            f"epochs {sum(_epochs_run(t) for t in trials)}",
        ]
        if self.best:
            parts.append(f"best val_acc {self.best[0]:.4f} ({self.best[1]}, epoch {self.best[2]})")
        eta = self._eta(trials, running, unstarted)
        if eta is not None:
            parts.append(f"ETA ≤{_clock(eta)}")
        return " | ".join(parts)

    def _eta(self, trials: list, running: int, unstarted: int) -> float | None:
        """Upper bound: remaining epochs if nothing else is stopped, at the observed epoch time."""
        if not self.epoch_seconds or running == 0:
            return None
        remaining = unstarted * self.max_epochs
        remaining += sum(target_epochs(t) - _epochs_run(t) for t in trials if t.status == "RUNNING")
        per_epoch = sum(self.epoch_seconds[-50:]) / len(self.epoch_seconds[-50:])
        return remaining * per_epoch / running


def _state(line: str) -> str:
    """A progress line without its leading ``[h:mm:ss]`` clock."""
    return line.split("] ", 1)[-1]


def _epochs_run(trial: Any) -> int:
    return int((trial.last_result or {}).get("epoch") or 0)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def repair_tables(study: StudyContext) -> list[str]:
    """Before a resume: set damaged part files aside (``STUDY/damaged/``) and rebuild their trials'
    rows by replaying Ray's saved results (``trial_*/result.json``) through :class:`ParquetCallback`,
    the same code that wrote them. Returns one line per damaged file, saying what was done."""
    study_dir = study.folder
    damaged = tables.damaged_parts(study_dir)
    if not damaged:
        return []
    import json

    from ray.tune import ExperimentAnalysis

    from tune_cifar.trainable import trial_dirname

    ray_trials = ExperimentAnalysis(str(study_dir)).trials  # loaded first: nothing moves if this fails
    aside = study_dir / "damaged"
    lost = {part.stem.removeprefix("part-") for part in damaged}
    for part in damaged:
        (aside / part.parent.name).mkdir(parents=True, exist_ok=True)
        part.replace(aside / part.parent.name / part.name)
    writer = ParquetCallback(study)
    rebuilt = set()
    for trial in ray_trials:
        results = study_dir / trial_dirname(trial) / "result.json"
        if trial.trial_id not in lost or not results.is_file():
            continue
        for name in tables.TABLES:  # every table of the trial is rewritten from the replay
            tables.part_path(study_dir, name, trial.trial_id).unlink(missing_ok=True)
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
