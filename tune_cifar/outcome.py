"""How a trial ended: one type that every view reads, decided by one function.

Ray calls a trial ASHA stopped ``TERMINATED`` like one that ran all its epochs, and a trial the
driver left behind (Ctrl-C) is neither. A study tells them apart by one rule, :func:`decide`,
and each :class:`Outcome` carries every view's word for itself: the ``trials`` table's
``status`` and ``stop_reason``, the Optuna state the searcher tells, the W&B run's tag and the
console's count. Adding an outcome is adding a member here (and its case in :func:`decide`).

No pandas, Ray or Optuna here: the searcher maps :attr:`Outcome.optuna_state` (a name) to
Optuna's ``TrialState`` itself, and the analysis reads the table's words.
"""

from __future__ import annotations

import math
from enum import Enum


class Outcome(Enum):
    """``(status, stop_reason, optuna_state, wandb_tag, console)``: each view's word for the outcome.

    ``stop_reason`` of ERROR is completed with the error's last line (``error: ...``).
    ``optuna_state`` is None while Optuna's trial stays RUNNING (a live or interrupted trial).
    """

    RUNNING = ("RUNNING", None, None, None, "running")
    INTERRUPTED = ("RUNNING", "interrupted", None, "interrupted", "unfinished")
    COMPLETED = ("TERMINATED", "completed", "COMPLETE", "completed", "ran all epochs")
    STOPPED = ("STOPPED", "asha", "PRUNED", "asha-stopped", "stopped by ASHA")
    # Its training loss became NaN or infinite; it stopped at that epoch. PRUNED, not FAIL: TPE
    # ignores FAIL trials and would propose the same region again, while a PRUNED trial (with its
    # last intermediate value) ranks below every finished one.
    DIVERGED = ("DIVERGED", "diverged", "PRUNED", "diverged", "diverged")
    ERROR = ("ERROR", "error", "FAIL", "error", "errors")

    def __init__(self, status: str, stop_reason: str | None, optuna_state: str | None, wandb_tag: str | None,
                 console: str) -> None:  # fmt: skip
        self.status = status
        self.stop_reason = stop_reason
        self.optuna_state = optuna_state
        self.wandb_tag = wandb_tag
        self.console = console

    def columns(self, error: str | None = None) -> dict[str, str | None]:
        """The ``trials`` row's ``status`` and ``stop_reason``; ``error`` is ERROR's message."""
        reason = f"error: {error}" if self is Outcome.ERROR and error else self.stop_reason
        return {"status": self.status, "stop_reason": reason}

    @classmethod
    def of_row(cls, status: str, stop_reason: str | None) -> Outcome:
        """The outcome a ``trials`` row records: by its ``status``, and where two outcomes share one
        (RUNNING: live or interrupted) by its ``stop_reason``; an unknown status reads as ERROR."""
        sharing = [outcome for outcome in cls if outcome.status == status]
        named = [outcome for outcome in sharing if outcome.stop_reason == stop_reason]
        return (named or sharing or [cls.ERROR])[0]

    @property
    def finished(self) -> bool:
        """A trial with a result to compare (it ran all its epochs, or to a rung)."""
        return self in (Outcome.COMPLETED, Outcome.STOPPED)

    @property
    def final(self) -> bool:
        """A trial that will not run again: finished, diverged, or failed for good. ``--resume``
        continues the rest."""
        return self.finished or self in (Outcome.DIVERGED, Outcome.ERROR)


# The trials table's statuses that mean "finished" (analysis filters the table by them).
FINISHED_STATUSES = tuple(dict.fromkeys(outcome.status for outcome in Outcome if outcome.finished))
WANDB_TAGS = tuple(outcome.wandb_tag for outcome in Outcome if outcome.wandb_tag)


def count_words(counts: dict[Outcome, int]) -> str:
    """``5 ran all epochs, 3 stopped by ASHA, 0 errors``: the console's counts of trials that ended
    (diverged and unfinished ones only when there are some); running trials are counted apart."""
    always = (Outcome.COMPLETED, Outcome.STOPPED, Outcome.ERROR)
    ended = [*(outcome for outcome in Outcome if outcome.final), Outcome.INTERRUPTED]
    shown = [outcome for outcome in ended if outcome in always or counts.get(outcome)]
    return ", ".join(f"{counts.get(outcome, 0)} {outcome.console}" for outcome in shown)


def diverged(train_loss: float | None) -> bool:
    """Whether an epoch's training loss says the run diverged (NaN or infinite): the trainer stops there."""
    return train_loss is not None and not math.isfinite(train_loss)


def decide(epochs_run: int, target_epochs: int, *, error: bool = False, ended: bool = True,
           interrupted: bool = False, last_train_loss: float | None = None) -> Outcome:  # fmt: skip
    """The outcome of a trial that ran ``epochs_run`` of its ``target_epochs`` (its config's ``epochs``).

    ``error``: it failed for good (after its retries). ``ended``: Ray ended it (completed it or
    the scheduler stopped it); a trial that has not ended is running, or, once the driver has
    stopped (``interrupted``), left for ``--resume``. An ended trial that ran every epoch is
    completed; one that ended earlier without an error was stopped at a rung by ASHA, unless the
    driver was being interrupted, when Ray ends live trials too: those are interrupted. An ended
    trial whose last epoch's training loss was not finite (``last_train_loss``) diverged.
    """
    if error:
        return Outcome.ERROR
    if ended and diverged(last_train_loss):
        return Outcome.DIVERGED
    if ended and epochs_run >= target_epochs:
        return Outcome.COMPLETED
    if interrupted:
        return Outcome.INTERRUPTED
    return Outcome.STOPPED if ended else Outcome.RUNNING
