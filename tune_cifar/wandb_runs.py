"""The W&B side of a study: a process of its own that opens one run per trial, logs each epoch,
draws the flow charts and closes the run; fed by :class:`tune_cifar.wandb_callback.WandbCallback`.

Why a process, not a thread of the driver: logging a report (about 70 values) through W&B's SDK
costs the driver's interpreter about as much as Ray Tune's own handling of the report, and W&B
keeps threads of its own busy beside it; in the driver they took turns with Ray Tune's event loop,
which every trial's results pass through (``benchmarks/driver_throughput.py``: W&B alone halved
the reports per second the driver absorbed). Here they use a core of their own where one is free.

No Ray here: the process imports this module, W&B and the tables' reader only.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import IO, Any

from tune_cifar import helper_process
from tune_cifar.outcome import WANDB_TAGS, Outcome
from tune_cifar.report import HEALTH_ORDER, EpochReport

# One chart series per tensor, keyed (layer_index, layer) so that sorting gives the forward order.
Flows = dict[tuple[int, str], dict[int, tuple[float | None, float | None]]]


class WandbRuns:
    """The study's open W&B runs and each run's per-layer history (for the flow charts)."""

    def __init__(self, folder: Path, study: str, mode: str, project: str):
        self.folder = folder  # the study folder: W&B writes its runs under it
        self.study = study
        self.mode = mode
        self.project = project
        self.runs: dict[str, Any] = {}
        self.flows: dict[str, Flows] = {}

    def _run(self, trial_id: str, config: dict[str, Any] | None, epoch: int = 1) -> Any:
        """The trial's run, opened at its first report here (``epoch``: a later one continues a resumed trial)."""
        if trial_id not in self.runs:
            import wandb

            run_id = re.sub(r"[^A-Za-z0-9_-]", "-", f"{self.study}-{trial_id}")[:120]
            self.runs[trial_id] = wandb.init(
                project=self.project,
                group=self.study,
                name=trial_id,
                id=run_id,
                resume="allow",
                job_type="trial",
                dir=str(self.folder),
                mode=self.mode,
                reinit="create_new",
                config=config,
                settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
            )
            self.runs[trial_id].define_metric("*", step_metric="epoch")
            self.flows[trial_id] = self._load_flows(trial_id, epoch) if epoch > 1 else {}
        return self.runs[trial_id]

    def _load_flows(self, trial_id: str, before: int) -> Flows:
        """Per-layer history of a resumed trial up to epoch ``before``, from the layers table the
        earlier driver wrote (a trial's first report here at epoch 1 has none: no reading)."""
        from tune_cifar.tables import trial_rows

        flows: Flows = {}
        for row in trial_rows(self.folder, "layers", trial_id):
            if row["epoch"] >= before:
                continue
            series = flows.setdefault((row["layer_index"], row["layer"]), {})
            series[row["epoch"]] = (row["grad_mean_abs"], row["update_ratio"])
        return flows

    def log(self, trial_id: str, config: dict[str, Any] | None, report: EpochReport) -> None:
        """One epoch: its metrics, and per layer mean |g|, ||ΔW||/||W||, ||W|| and health."""
        epoch = int(report.epoch["epoch"])
        run = self._run(trial_id, config, epoch)
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

    def finish(self, trial_id: str, ended: Outcome, summary: dict[str, Any], stop_reason: str | None) -> None:
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


def serve(jobs: IO[bytes], replies: IO[bytes], folder: Path, study: str, mode: str, project: str) -> None:
    """The W&B process (:class:`~tune_cifar.helper_process.HelperProcess`): carry out ``("log",
    ...)`` and ``("finish", ...)`` jobs in order until the driver closes its input. W&B is a view
    of the study, not part of it: a failure prints one warning line and ends the process; the
    driver finds its input closed and stops sending."""
    runs = WandbRuns(folder, study, mode, project)
    while (job := helper_process.receive(jobs)) is not None:
        action, *args = job
        try:
            getattr(runs, action)(*args)
        except Exception as exc:
            print(f"warning: W&B logging stopped ({type(exc).__name__}: {str(exc)[:200]}); the study continues",
                  flush=True)  # fmt: skip
            return
    for run in runs.runs.values():  # the driver closes every run before its input: it died
        run.finish(exit_code=1)
