"""W&B for a study: one run per trial, written from a thread of the driver's own.

A view of the study, not part of it: a W&B failure stops the W&B logging, never the study.
"""

from __future__ import annotations

import os
import queue
import re
import threading
from typing import Any

from ray import tune

from tune_cifar.outcome import WANDB_TAGS, Outcome
from tune_cifar.ray_trial import error_line, hyperparameter_row, outcome
from tune_cifar.report import HEALTH_ORDER, EpochReport
from tune_cifar.study_folder import StudyContext
from tune_cifar.tables import trial_rows

WANDB_CLOSE_TIMEOUT_S = 300  # how long the study's end waits for W&B to close its runs
# One chart series per tensor, keyed (layer_index, layer) so that sorting gives the forward order.
Flows = dict[tuple[int, str], dict[int, tuple[float | None, float | None]]]


class WandbCallback(tune.Callback):
    """One W&B run per trial, grouped by study: config, per-epoch metrics, per-layer statistics and
    gradient health, and at the end gradient-flow and weight-update-flow charts (mean |g| and
    ||ΔW||/||W|| of every layer across epochs, in forward order), the first report's dashboard.
    Each run ends with the trials table's status in its summary and the outcome's tag
    (:attr:`Outcome.wandb_tag`): W&B itself calls an ASHA-stopped run "finished" like a completed one.

    W&B works in a thread of its own: opening a run takes most of a second, which in Ray's event
    loop would hold up every trial (``benchmarks/study_overhead.py`` measured it as the largest
    driver-side cost). The callbacks hand over copies of what they saw, in order; the experiment's
    end waits for the thread to finish every run.
    """

    def __init__(self, study: StudyContext, mode: str, project: str = "tune-cifar"):
        self.study = study  # restored by --resume as the resuming driver's (see tune_cifar.study_folder)
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
                os.environ.setdefault(variable, str(self.study.folder.wandb / where))
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

            run_id = re.sub(r"[^A-Za-z0-9_-]", "-", f"{self.study.name}-{trial_id}")[:120]
            self.runs[trial_id] = wandb.init(
                project=self.project,
                group=self.study.name,
                name=trial_id,
                id=run_id,
                resume="allow",
                job_type="trial",
                dir=str(self.study.folder.path),
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
        for row in trial_rows(self.study.folder.path, "layers", trial_id):
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
            if row.get("health") in HEALTH_ORDER:
                # the layers table's judgement (telemetry.layer_health) as a number W&B can chart:
                # 0 ok, 1 vanishing, 2 exploding
                metrics[f"health/{layer}"] = HEALTH_ORDER.index(row["health"])
        run.log(metrics)

    def _finish(self, trial_id: str, ended: Outcome, summary: dict[str, Any], stop_reason: str | None) -> None:
        """Charts, summary, tag, then close the run."""
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
            | {"status": ended.status, "stop_reason": stop_reason}
        )
        # a resumed run keeps its earlier tags: replace the outcome, keep anything else
        run.tags = (*(tag for tag in run.tags if tag not in WANDB_TAGS), ended.wandb_tag)
        run.finish(exit_code=1 if ended is Outcome.ERROR else 0)  # W&B's own state: failed for an error

    def _close(self, trial: Any, ended: Outcome) -> None:
        """Hand the W&B thread what closing ``trial``'s run needs, read now (Ray's trial changes later)."""
        if trial.trial_id not in self.open:
            return
        self.open.discard(trial.trial_id)
        summary = EpochReport.from_result(trial.last_result or {}).trial
        stop_reason = ended.columns(error_line(trial) if ended is Outcome.ERROR else None)["stop_reason"]
        self._submit(self._finish, trial.trial_id, ended, summary, stop_reason)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, outcome(trial))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, outcome(trial, error=True))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial in trials:  # runs still open: the trial did not finish, --resume continues it
            self._close(trial, outcome(trial, ended=False, interrupted=True))
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join(timeout=WANDB_CLOSE_TIMEOUT_S)
            if self._worker.is_alive():  # e.g. an online W&B that stopped answering: the study is done
                print(f"warning: W&B runs still closing after {WANDB_CLOSE_TIMEOUT_S} s; not waiting any longer")
            self._worker = None
