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
import re
import time
from pathlib import Path
from typing import Any

from ray import tune

from tune_cifar import config as cfg
from tune_cifar import tables
from tune_cifar.errors import UsageError
from tune_cifar.tables import TrialRecord

logger = logging.getLogger(__name__)

EPOCH_COLUMNS = tuple(name for name in tables.SCHEMAS["epochs"].names if name != "trial_id")

_study_dir_override: Path | None = None


def relocate(study_dir: Path | None) -> None:
    """Callbacks restored by ``--resume`` write to this folder, wherever the first driver wrote."""
    global _study_dir_override
    _study_dir_override = Path(study_dir) if study_dir is not None else None


class _StudyFolder:
    """The study folder a callback writes to: the one given, unless the driver relocated the study."""

    _folder: Path

    @property
    def study_dir(self) -> Path:
        return _study_dir_override or self._folder

    @study_dir.setter
    def study_dir(self, folder: Path) -> None:
        self._folder = Path(folder)


def trial_values(trial: Any) -> dict[str, Any]:
    """A Ray trial's vocabulary values (sampled + constants); inactive keys fall back to defaults."""
    return {key: value for key, value in trial.config.items() if key in cfg.KEYS}


def hyperparameter_row(trial: Any) -> dict[str, Any]:
    """The trial's hyperparameter columns: every vocabulary key, inactive ones null.

    A configuration the vocabulary refuses (a sampled value the trial will fail on) is recorded
    as sampled, so that the trial shows up as an ERROR row instead of ending the whole study.
    """
    values = trial_values(trial)
    try:
        return cfg.to_row(cfg.from_dict(values, source=f"trial {trial.trial_id}"))
    except UsageError:
        raw = {key: values.get(key) for key in cfg.KEYS}
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


class ParquetCallback(_StudyFolder, tune.Callback):
    """Writes ``trials``, ``epochs``, ``layers`` and ``steps`` under the study folder as results arrive."""

    def __init__(self, study_dir: Path, study_name: str):
        self.study_dir = Path(study_dir)
        self.study_name = study_name
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
        epoch = int(result["epoch"])
        record = self.record(trial)
        record.drop_after(epoch - 1)  # a retried trial redoes the epochs after its checkpoint
        record.add("epochs", [{key: result.get(key) for key in EPOCH_COLUMNS}])
        record.add("layers", list(result.get("layers") or []))
        record.add("steps", list(result.get("steps") or []))
        summary = dict(result.get("trial") or {})
        self._update(trial, **summary, status="RUNNING", stop_reason=None, wall_s=result.get("time_total_s"))

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = int((trial.last_result or {}).get("epoch") or 0)
        self.record(trial).drop_after(last)
        self._update(trial, status="RUNNING", stop_reason=f"retrying: {error_line(trial)}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        record = self.record(trial)
        epochs_run = int(record.trial.get("epochs_run") or 0)
        if epochs_run >= target_epochs(trial):
            self._update(trial, status="TERMINATED", stop_reason="completed")
        else:
            self._update(trial, status="STOPPED", stop_reason="asha")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, status="ERROR", stop_reason=f"error: {error_line(trial)}")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial in trials:
            record = self.records.get(trial.trial_id)
            if record is not None and record.trial.get("status") == "RUNNING":
                self._update(trial, stop_reason="interrupted")
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


class WandbCallback(_StudyFolder, tune.Callback):
    """One W&B run per trial, grouped by study: config, per-epoch metrics, per-layer statistics,
    and at the end gradient-flow and weight-update-flow charts (mean |g| and ||ΔW||/||W|| of every
    layer across epochs), the first report's dashboard."""

    def __init__(self, study_dir: Path, study_name: str, mode: str, project: str = "tune-cifar"):
        self.study_dir = Path(study_dir)
        self.study_name = study_name
        self.mode = mode
        self.project = project
        self.runs: dict[str, Any] = {}
        self.flows: dict[str, dict[str, dict[int, tuple[float | None, float | None]]]] = {}
        self.failed = False

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "runs": {}, "flows": {}, "failed": False}  # open runs stay with this driver

    def _run(self, trial: Any) -> Any:
        if trial.trial_id not in self.runs:
            import wandb

            # W&B's caches and artifact staging (~/.cache/wandb, ~/.local/share/wandb) go into the
            # study folder, unless the user chose places for them.
            for variable, where in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"),
                                    ("WANDB_ARTIFACT_DIR", "artifacts")):  # fmt: skip
                os.environ.setdefault(variable, str(self.study_dir / "wandb" / where))

            run_id = re.sub(r"[^A-Za-z0-9_-]", "-", f"{self.study_name}-{trial.trial_id}")[:120]
            self.runs[trial.trial_id] = wandb.init(
                project=self.project,
                group=self.study_name,
                name=trial.trial_id,
                id=run_id,
                resume="allow",
                job_type="trial",
                dir=str(self.study_dir),
                mode=self.mode,
                reinit="create_new",
                config=hyperparameter_row(trial),
                settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
            )
            self.runs[trial.trial_id].define_metric("*", step_metric="epoch")
            self.flows[trial.trial_id] = self._load_flows(trial.trial_id)
        return self.runs[trial.trial_id]

    def _load_flows(self, trial_id: str) -> dict[str, dict[int, tuple[float | None, float | None]]]:
        """Per-layer history of a resumed trial, from the layers table the earlier driver wrote."""
        flows: dict[str, dict[int, tuple[float | None, float | None]]] = {}
        for row in TrialRecord.load(self.study_dir, trial_id).rows["layers"].values():
            flows.setdefault(row["layer"], {})[row["epoch"]] = (row["grad_mean_abs"], row["update_ratio"])
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
        self._guarded(self._log, trial, result)

    def _log(self, trial: Any, result: dict) -> None:
        run = self._run(trial)
        epoch = int(result["epoch"])
        metrics: dict[str, Any] = {key: result.get(key) for key in EPOCH_COLUMNS if result.get(key) is not None}
        for row in result.get("layers") or []:
            layer = row["layer"]
            self.flows[trial.trial_id].setdefault(layer, {})[epoch] = (row["grad_mean_abs"], row["update_ratio"])
            for stat in ("grad_mean_abs", "update_ratio", "weight_l2"):
                if row.get(stat) is not None:
                    metrics[f"{stat}/{layer}"] = row[stat]
        run.log(metrics)

    def _finish(self, trial: Any, state: str) -> None:
        run = self.runs.pop(trial.trial_id, None)
        if run is None:
            return
        import wandb

        flows = self.flows.pop(trial.trial_id, {})
        for index, title, key in ((0, "gradient flow: mean |g| per layer", "grad_flow"),
                                  (1, "weight-update flow: ||ΔW|| / ||W|| per layer", "update_flow")):  # fmt: skip
            layers = sorted(flows)
            epochs = sorted({epoch for history in flows.values() for epoch in history})
            if not layers or not epochs:
                continue
            ys = [[flows[layer].get(epoch, (None, None))[index] for epoch in epochs] for layer in layers]
            run.log({key: wandb.plot.line_series(xs=epochs, ys=ys, keys=layers, title=title, xname="epoch")})
        summary = dict((trial.last_result or {}).get("trial") or {})
        run.summary.update({key: value for key, value in summary.items() if value is not None} | {"status": state})
        run.finish()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._guarded(self._finish, trial, "finished")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._guarded(self._finish, trial, "error")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial in trials:
            self._guarded(self._finish, trial, "interrupted")


class ConsoleCallback(tune.Callback):
    """A compact progress line instead of Ray's trial table: counts, best so far, epochs, ETA."""

    def __init__(self, num_samples: int, max_epochs: int, interval_s: float = 15.0):
        self.num_samples = num_samples
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
            print(self.line(trials), flush=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        print(self.line(trials), flush=True)

    def line(self, trials: list) -> str:
        counts: dict[str, int] = {}
        for trial in trials:
            counts[trial.status] = counts.get(trial.status, 0) + 1
        stopped = sum(1 for t in trials if t.status == "TERMINATED" and _epochs_run(t) < target_epochs(t))
        done = counts.get("TERMINATED", 0)
        running = counts.get("RUNNING", 0)
        unstarted = max(self.num_samples - len(trials), 0) + counts.get("PENDING", 0) + counts.get("PAUSED", 0)
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


def _epochs_run(trial: Any) -> int:
    return int((trial.last_result or {}).get("epoch") or 0)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def repair_tables(study_dir: Path, study_name: str) -> list[str]:
    """Before a resume: set damaged part files aside (``STUDY/damaged/``) and rebuild their trials'
    rows by replaying Ray's saved results (``trial_*/result.json``) through :class:`ParquetCallback`,
    the same code that wrote them. Returns one line per damaged file, saying what was done."""
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
    writer = ParquetCallback(study_dir, study_name)
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
