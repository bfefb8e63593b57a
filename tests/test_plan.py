"""The study plan (one resolution of space file + flags, saved as study.json) and the outcome type."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ray.tune.schedulers import ASHAScheduler

from tune_cifar import spaces
from tune_cifar.errors import UsageError
from tune_cifar.outcome import FINISHED_STATUSES, WANDB_TAGS, Outcome, decide
from tune_cifar.plan import STUDY_FLAGS, StudyPlan
from tune_cifar.study_folder import StudyFolder

REPO = Path(__file__).resolve().parents[1]


def flags(**given: object) -> argparse.Namespace:
    """``tune_cifar.search``'s parsed flags, each unset unless given."""
    names = (*STUDY_FLAGS, "wandb", "data_dir", "max_concurrent")
    return argparse.Namespace(**({name: None for name in names} | given))


def new_study(folder: Path, space: str = "smoke", **given: object) -> StudyPlan:
    """What a new study writes before any trial runs: its space copy and its plan."""
    study = StudyFolder(folder)
    folder.mkdir(parents=True)
    loaded = spaces.load(space)
    shutil.copyfile(loaded.path, study.space)
    plan = StudyPlan.from_args(flags(space=space, **given), loaded, folder.name)
    plan.save(study)
    return plan


@pytest.mark.parametrize(("grace", "factor", "max_epochs"), [(1, 3, 27), (1, 2, 6), (1, 3, 3), (2, 3, 20), (5, 3, 4)])
def test_rungs_are_where_rays_asha_stops_trials(tmp_path: Path, grace: int, factor: int, max_epochs: int) -> None:
    """One computation of the rungs, pinned against Ray's own scheduler (its rung milestones are
    private, read here only to check the agreement): the same epochs below max_t."""
    space = tmp_path / "asha.yaml"
    text = (REPO / "search_spaces" / "smoke.yaml").read_text().replace("max_epochs: 3", f"max_epochs: {max_epochs}")
    asha = f"grace_period: 1, reduction_factor: {factor}"
    space.write_text(text.replace("grace_period: 1, reduction_factor: 3", asha))
    if grace > max_epochs:
        with pytest.raises(UsageError, match="below the ASHA grace period"):
            StudyPlan.from_args(flags(grace_period=grace), spaces.load(space), "a")
        return
    plan = StudyPlan.from_args(flags(grace_period=grace), spaces.load(space), "a")
    ray = ASHAScheduler(time_attr="epoch", max_t=max_epochs, grace_period=grace, reduction_factor=factor)
    ray_rungs = sorted(milestone for milestone, _ in ray._brackets[0]._rungs if milestone < max_epochs)
    assert list(plan.rungs) == ray_rungs
    assert plan.budgets == (*ray_rungs, max_epochs)


def test_a_space_without_asha_has_no_rungs(tmp_path: Path) -> None:
    plan = StudyPlan.from_args(flags(), spaces.load("seed_best"), "b")
    assert plan.grace_period is None and plan.rungs == () and plan.budgets == (100,)


def test_the_plan_holds_the_effective_space_and_loads_back_identical(tmp_path: Path) -> None:
    """--set, --max-epochs, --precision and --seeds resolved once; study.json holds the inputs and
    a load rebuilds the same effective space from the study's copy of its space file."""
    plan = new_study(tmp_path / "s", "grid_optimizers", max_epochs=4, precision="fp32", seeds=2,
                     set=["filters=8,16,32", "lr=0.01"])  # fmt: skip
    assert plan.space.max_epochs == 4 and plan.space.fixed["precision"] == "fp32"
    assert plan.space.fixed["filters"] == "8,16,32" and plan.space.fixed["lr"] == 0.01
    assert plan.space.grid["seed"] == (0, 1) and plan.num_samples == 8  # 4 optimizers x 2 seeds
    loaded = StudyPlan.load(tmp_path / "s")
    assert loaded == plan and loaded.space.path == StudyFolder(tmp_path / "s").space  # read from the copy
    assert dataclasses.replace(loaded.space, path=plan.space.path) == plan.space
    stored = json.loads(StudyFolder(tmp_path / "s").plan.read_text())
    assert "space" not in stored and stored["held"] == {"filters": "8,16,32", "lr": 0.01}


def test_a_study_json_from_before_the_plan_still_loads(tmp_path: Path) -> None:
    """study.json of earlier versions (``space`` for the file, no max_concurrent, grace left implicit)."""
    folder = StudyFolder(tmp_path / "old")
    folder.path.mkdir()
    shutil.copyfile(spaces.load("smoke").path, folder.space)
    folder.plan.write_text(json.dumps({
        "name": "old", "space": "search_spaces/smoke.yaml", "num_samples": 8, "max_epochs": 3, "data": "synthetic",
        "subset": 640, "val_size": 128, "seed": 0, "wandb": "offline", "data_dir": None, "precision": None,
        "seeds": 1, "held": None, "grace_period": None,
    }))  # fmt: skip
    plan = StudyPlan.load(folder.path)
    assert plan.space_file == "search_spaces/smoke.yaml" and plan.held == {}
    assert plan.grace_period == 1 and plan.rungs == (1,) and plan.max_concurrent == 2


def test_resume_keeps_the_plan_and_refuses_a_changed_study_flag(tmp_path: Path) -> None:
    plan = new_study(tmp_path / "s", max_epochs=2)
    stored = StudyPlan.load(tmp_path / "s")
    same = stored.resumed(flags(space="smoke", max_epochs=2, wandb="disabled"))  # the original command, again
    assert same.max_epochs == 2 and same.wandb == "disabled" and same.space.params == plan.space.params
    grown = stored.resumed(flags(num_samples=12))
    assert grown.num_samples == 12 and grown.space.max_epochs == plan.space.max_epochs == 2
    with pytest.raises(UsageError, match="--max-epochs 3: the study was started with 2"):
        stored.resumed(flags(max_epochs=3))
    with pytest.raises(UsageError, match="--num-samples 4: the study was started with 8"):
        stored.resumed(flags(num_samples=4))


def test_a_folder_without_a_plan_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a tune-cifar study"):
        StudyPlan.load(tmp_path)
    assert StudyPlan.load_if_any(tmp_path) is None


# -- the outcome ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("epochs_run", "target", "kwargs", "expected"),
    [
        (3, 3, {}, Outcome.COMPLETED),
        (1, 3, {}, Outcome.STOPPED),
        (1, 3, {"error": True}, Outcome.ERROR),
        (3, 3, {"error": True}, Outcome.ERROR),
        (1, 3, {"ended": False}, Outcome.RUNNING),
        (1, 3, {"ended": False, "interrupted": True}, Outcome.INTERRUPTED),
        (1, 3, {"interrupted": True}, Outcome.INTERRUPTED),  # Ray ends live trials when the driver stops
        (3, 3, {"interrupted": True}, Outcome.COMPLETED),
        (1, 3, {"last_train_loss": float("nan")}, Outcome.DIVERGED),
        (3, 3, {"last_train_loss": float("inf")}, Outcome.DIVERGED),
        (1, 3, {"last_train_loss": 2.3}, Outcome.STOPPED),
        (1, 3, {"last_train_loss": float("nan"), "error": True}, Outcome.ERROR),
        (1, 3, {"last_train_loss": float("nan"), "ended": False}, Outcome.RUNNING),
    ],
)
def test_one_rule_decides_how_a_trial_ended(epochs_run: int, target: int, kwargs: dict, expected: Outcome) -> None:
    assert decide(epochs_run, target, **kwargs) is expected


def test_every_view_reads_the_outcome_back_from_its_table_row() -> None:
    for outcome in Outcome:
        columns = outcome.columns("RuntimeError: boom")
        assert Outcome.of_row(columns["status"], columns["stop_reason"]) is outcome
    assert Outcome.ERROR.columns("RuntimeError: boom")["stop_reason"] == "error: RuntimeError: boom"
    assert FINISHED_STATUSES == ("TERMINATED", "STOPPED")
    assert len(set(WANDB_TAGS)) == len(WANDB_TAGS) == 5 and len({o.console for o in Outcome}) == len(Outcome)


def test_the_training_path_imports_neither_pandas_pyarrow_nor_ray() -> None:
    """The hot path stays light: a worker or a single run imports no table or cluster machinery for training."""
    code = "import sys, tune_cifar.engine, tune_cifar.report; print(sorted(m for m in ('pandas', 'pyarrow', 'ray', 'optuna') if m in sys.modules))"  # noqa: E501
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_the_console_never_counts_an_interrupted_trial_as_stopped_by_asha(tmp_path: Path) -> None:
    """19.5: Ray marks the trials it stops when the driver stops TERMINATED, without completing them.
    Plain objects stand in for Ray's trials: the console reads only these attributes."""
    from tune_cifar.console_callback import ConsoleCallback
    from tune_cifar.study_folder import StudyContext

    def trial(trial_id: str, status: str, epochs: int) -> argparse.Namespace:
        last = {"epoch": epochs, "train_loss": 1.0} if epochs else {}
        return argparse.Namespace(trial_id=trial_id, status=status, last_result=last, config={"epochs": 4})

    console = ConsoleCallback(StudyContext(tmp_path, "c", 8), max_epochs=4)
    asha, done, cut, placed = (
        trial("asha", "RUNNING", 1),
        trial("done", "RUNNING", 4),
        trial("cut", "RUNNING", 2),
        trial("placed", "PENDING", 0),
    )
    for live in (asha, done, cut):
        console.on_trial_start(0, [], live)
    asha.status = done.status = "TERMINATED"
    console.on_trial_complete(0, [], asha)  # ASHA stopped it at its rung
    console.on_trial_complete(0, [], done)
    cut.status = placed.status = "TERMINATED"  # the driver stopped: Ray ended both, completing neither
    earlier = trial("earlier", "TERMINATED", 4)  # finished under the driver before a --resume
    line = console.line([asha, done, cut, placed, earlier, trial("waiting", "PENDING", 0)])
    assert "0 running, 3 pending, 2 ran all epochs, 1 stopped by ASHA, 0 errors, 2 unfinished" in line, line
