"""Pins every private API of Ray and Optuna the project uses (``tune_cifar/private_api.py``), so an
upgrade that changes one fails here, by name. The README ("Upgrading Ray or Optuna") lists them."""

from __future__ import annotations

from pathlib import Path

import optuna
from ray.tune.search import Searcher, SearchGenerator

from tune_cifar import private_api


class _Nothing(Searcher):
    def suggest(self, trial_id: str) -> dict:
        return {}


def test_the_trial_count_of_rays_search_generator_can_be_set() -> None:
    """What the count does in Ray: the generator is finished once it created that many trials."""
    generator = SearchGenerator(_Nothing())
    private_api.set_trial_count(generator, 0)
    assert private_api.trial_count(generator) == 0 and generator.is_finished()
    private_api.set_trial_count(generator, 7)
    assert private_api.trial_count(generator) == 7 and not generator.is_finished()


def test_an_optuna_trial_asked_earlier_can_be_reached_by_its_storage_id(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=storage, study_name="pin", direction="maximize")
    asked = study.ask()
    trial_id = private_api.optuna_trial_id(asked)
    assert trial_id == private_api.optuna_trial_id(study.get_trials(deepcopy=False)[0])
    reopened = optuna.load_study(study_name="pin", storage=storage)
    private_api.optuna_trial(reopened, trial_id).report(0.5, 1)
    reopened.tell(asked.number, 0.6)
    (frozen,) = optuna.load_study(study_name="pin", storage=storage).get_trials()
    assert frozen.intermediate_values == {1: 0.5} and frozen.value == 0.6


def test_the_gcs_cluster_config_reader_exists() -> None:
    """Without a running cluster it raises or returns None; what matters is that Ray still has it."""
    from ray._private.state import state

    assert callable(state.get_cluster_config) and callable(private_api.gcs_cluster_config)
