"""The Ray Tune ``Tuner`` of a study: the trainable with its resources and checkpoints, TPE (our
searcher), ASHA or FIFO, and the driver-side callbacks; built new, or restored by ``--resume``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray import tune

from tune_cifar.plan import StudyPlan
from tune_cifar.ray_session import Placement
from tune_cifar.storage import StudyStorage
from tune_cifar.study_folder import StudyContext, trial_dirname


@dataclass(frozen=True)
class RunOptions:
    """How this driver runs the study (not what the study is: that is the plan): may differ on resume."""

    max_failures: int  # retries of a failed trial from its checkpoint
    checkpoint_every: int  # epochs between checkpoints (rungs and the last epoch always get one)


def trainable(plan: StudyPlan, splits: Any, placement: Placement, options: RunOptions) -> Any:
    """``train_trial`` with the study's data (shared through Ray's object store), its resources and
    its checkpoint policy."""
    from tune_cifar.trainable import CheckpointPolicy, train_trial

    checkpoints = CheckpointPolicy(options.checkpoint_every, plan.rungs)
    return tune.with_resources(
        tune.with_parameters(
            train_trial, splits=splits, cpus=placement.cpus, gpus=placement.gpus, checkpoints=checkpoints
        ),
        {"cpu": placement.cpus, "gpu": placement.gpus},
    )


def scheduler(plan: StudyPlan) -> Any:
    """ASHA on the plan's grace period and reduction factor (its rungs are :attr:`StudyPlan.rungs`), or FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if plan.grace_period is None:
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epoch",  # the trainer's own count, also across retries from older checkpoints
        max_t=plan.max_epochs,
        grace_period=plan.grace_period,
        reduction_factor=plan.reduction_factor,
    )


def new_tuner(
    plan: StudyPlan, study: StudyContext, storage: StudyStorage, trainable: Any, one_node: bool, options: RunOptions
) -> tune.Tuner:
    """The Tuner of a new study."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from tune_cifar import searcher
    from tune_cifar.console_callback import ConsoleCallback
    from tune_cifar.parquet_callback import ParquetCallback
    from tune_cifar.wandb_callback import WandbCallback

    callbacks: list[Any] = [JsonLoggerCallback(), CSVLoggerCallback(), ParquetCallback(study)]
    if plan.wandb != "disabled":
        callbacks.append(WandbCallback(study, plan.wandb))
    callbacks.append(ConsoleCallback(study, plan.max_epochs))
    search = searcher.StudySearch(plan.space, study, seed=plan.seed, max_concurrent=plan.max_concurrent or 0)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=searcher.METRIC,
            mode="max",
            search_alg=searcher.StudyTrials(search),
            scheduler=scheduler(plan),
            num_samples=plan.num_samples,
            reuse_actors=one_node,
            trial_dirname_creator=trial_folder_name,
        ),
        run_config=tune.RunConfig(
            name=plan.name,
            storage_path=storage.storage,
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=options.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=0,
        ),
    )


def restored_tuner(storage: StudyStorage, trainable: Any) -> tune.Tuner:
    """The Tuner of a study Ray saved: its searcher, scheduler and callbacks as they were pickled."""
    return tune.Tuner.restore(storage.experiment, trainable, resume_unfinished=True, resume_errored=True)


def trial_folder_name(trial: Any) -> str:
    """Ray's ``trial_dirname_creator``: short trial folders (Ray's default embeds every sampled value)."""
    return trial_dirname(trial.trial_id)
