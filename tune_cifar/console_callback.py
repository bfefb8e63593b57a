"""The study's console: a compact progress line instead of Ray's trial table."""

from __future__ import annotations

import time
from typing import Any

from ray import tune

from tune_cifar.outcome import Outcome, count_words
from tune_cifar.ray_trial import epochs_run, error_line, outcome, target_epochs
from tune_cifar.study_folder import StudyContext


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
        self.live: set[str] = set()  # trials that ran in this driver
        self.ended: dict[str, Outcome] = {}  # how those that Ray ended in this driver ended

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "best": None, "epoch_seconds": [], "live": set(), "ended": {}}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.live.add(trial.trial_id)

    def setup(self, **info: Any) -> None:
        self.started = time.monotonic()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.live.add(trial.trial_id)
        if result.get("seconds"):
            self.epoch_seconds.append(float(result["seconds"]))
        value = result.get("val_acc")
        if value is not None and (self.best is None or value > self.best[0]):
            self.best = (float(value), trial.trial_id, int(result["epoch"]))

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"trial {trial.trial_id} failed, retrying from its last checkpoint: {error_line(trial)}", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended[trial.trial_id] = outcome(trial, error=True)
        print(f"trial {trial.trial_id} failed: {error_line(trial)}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended[trial.trial_id] = outcome(trial)
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

    def outcome_of(self, trial: Any) -> Outcome | None:
        """How a Ray trial stands, None while it waits to start. Ray marks the trials it stops when
        the driver stops ``TERMINATED`` without completing them: a trial that ran here, or never
        reported at all, and ended unseen was interrupted, never stopped by ASHA."""
        if trial.status in ("PENDING", "PAUSED"):
            return None
        if trial.status == "RUNNING":
            return Outcome.RUNNING
        if trial.trial_id in self.ended:
            return self.ended[trial.trial_id]
        if trial.status == "ERROR":
            return outcome(trial, error=True)  # failed for good under an earlier driver
        if trial.trial_id in self.live or epochs_run(trial) == 0:
            return Outcome.INTERRUPTED  # ran here, or never ran at all (placed, then the driver stopped)
        return outcome(trial)  # ended under an earlier driver

    def line(self, trials: list) -> str:
        counts: dict[Outcome, int] = {}
        waiting = 0
        for trial in trials:
            now = self.outcome_of(trial)
            if now is None:
                waiting += 1
            else:
                counts[now] = counts.get(now, 0) + 1
        unstarted = max(self.study.num_samples - len(trials), 0) + waiting
        running = counts.get(Outcome.RUNNING, 0)
        parts = [
            f"[{_clock(time.monotonic() - self.started)}] {running} running, {unstarted} pending, "
            + count_words(counts),
            f"epochs {sum(epochs_run(t) for t in trials)}",
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
        remaining += sum(target_epochs(t) - epochs_run(t) for t in trials if t.status == "RUNNING")
        per_epoch = sum(self.epoch_seconds[-50:]) / len(self.epoch_seconds[-50:])
        return remaining * per_epoch / running


def _state(line: str) -> str:
    """A progress line without its leading ``[h:mm:ss]`` clock."""
    return line.split("] ", 1)[-1]


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
