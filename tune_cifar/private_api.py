"""Every private API of Ray and Optuna the study relies on, each behind one named function.

Nothing else in the project reaches into a dependency's internals. Each function says which
public API is missing; ``tests/test_private_api.py`` pins each one against the installed
versions, so an upgrade that changes one fails there, by name, instead of in a study. The README
("Upgrading Ray or Optuna") lists what breaks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the trial workers import this module's neighbours, never Optuna
    import optuna


def set_trial_count(generator: Any, count: int) -> None:
    """How many trials Ray's ``SearchGenerator`` creates (its private ``_total_samples``).

    Ray restores the count from the experiment state and offers no setter, so a study could not
    grow (``--resume --num-samples N``) without it.
    """
    generator._total_samples = count


def trial_count(generator: Any) -> int:
    """The count :func:`set_trial_count` sets."""
    return int(generator._total_samples)


def optuna_trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """The storage's id of an Optuna trial (private ``_trial_id``): what :func:`optuna_trial` takes.

    Optuna's public API names trials by ``number`` in ``Study.tell`` but offers no way to report an
    intermediate value to a trial asked earlier (by another driver, before a ``--resume``) except
    through a ``Trial`` built from this id.
    """
    return int(trial._trial_id)


def optuna_trial(study: optuna.Study, trial_id: int) -> optuna.Trial:
    """A live ``optuna.Trial`` for a trial already in ``study`` (its constructor is documented as
    not meant for users), to report intermediate values and set attributes on it."""
    import optuna

    return optuna.Trial(study, trial_id)


def gcs_cluster_config() -> Any:
    """The cluster config the autoscaler published in Ray's GCS (``ray._private.state``), or None.

    Its node groups say which node types an autoscaling cluster may add; no public API reads them.
    """
    from ray._private.state import state

    return state.get_cluster_config()
