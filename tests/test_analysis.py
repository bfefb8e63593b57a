"""Tests of the analysis scripts on small study folders: every number is checked against the Parquet data."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tune_cifar import cli
from tune_cifar import config as cfg
from tune_cifar.analysis import _study, best_config, bn_landscape, gradient_flow, search_views
from tune_cifar.plan import StudyPlan
from tune_cifar.spaces import load as load_space
from tune_cifar.study_folder import StudyFolder
from tune_cifar.tables import TableWriter

REPO = Path(__file__).resolve().parents[1]
from tune_cifar.telemetry import layer_health  # noqa: E402

# -- fabricated studies: consistent rows written with the project's own TableWriter ---------------
LAYERS = {  # name -> numel, as the conditioned CNN names its parameters (features before classifier)
    "features.conv1.weight": 1728,
    "features.conv1.bias": 64,
    "features.bn1.weight": 64,
    "features.bn1.bias": 64,
    "features.conv2.weight": 73728,
    "features.conv2.bias": 128,
    "classifier.fc1.weight": 2_097_152,
    "classifier.fc1.bias": 512,
    "classifier.fc2.weight": 131_072,
    "classifier.fc2.bias": 256,
    "classifier.fc3.weight": 2560,
    "classifier.fc3.bias": 10,
}
FAKE_TRIALS: list[dict[str, Any]] = [  # (config, quality 0..1, epochs run, status)
    {
        "config": dict(
            optimizer="adam",
            lr=2e-3,
            scheduler="cosine",
            loss="label_smoothing",
            activation="leaky_relu",
            filters=(64, 128, 256),
            batch_size=128,
        ),
        "quality": 0.86,
        "epochs_run": 6,
        "status": "TERMINATED",
    },
    {
        "config": dict(
            optimizer="adamw",
            lr=1e-3,
            scheduler="cosine",
            loss="cross_entropy",
            activation="relu",
            filters=(64, 128, 256),
            batch_size=64,
        ),
        "quality": 0.84,
        "epochs_run": 6,
        "status": "TERMINATED",
    },
    {
        "config": dict(
            optimizer="sgd",
            lr=5e-2,
            momentum=0.9,
            scheduler="step",
            loss="cross_entropy",
            activation="elu",
            filters=(32, 64, 128),
            batch_size=128,
        ),
        "quality": 0.80,
        "epochs_run": 6,
        "status": "TERMINATED",
    },
    {
        "config": dict(
            optimizer="adam",
            lr=3e-4,
            scheduler="none",
            loss="focal",
            activation="relu",
            filters=(32, 64, 128),
            batch_size=64,
        ),
        "quality": 0.71,
        "epochs_run": 4,
        "status": "STOPPED",
    },
    {
        "config": dict(
            optimizer="sgd",
            lr=1e-3,
            momentum=0.5,
            scheduler="none",
            loss="focal",
            activation="elu",
            filters=(64, 128, 256),
            batch_size=128,
            batchnorm=False,
        ),
        "quality": 0.55,
        "epochs_run": 2,
        "status": "STOPPED",
        "vanishing": True,
    },
    {
        "config": dict(
            optimizer="sign_sgd",
            lr=1e-4,
            momentum=0.0,
            scheduler="step",
            loss="cross_entropy",
            activation="leaky_relu",
            filters=(32, 64, 128),
            batch_size=64,
        ),
        "quality": 0.45,
        "epochs_run": 1,
        "status": "STOPPED",
    },
    {
        "config": dict(
            optimizer="adamw",
            lr=8e-3,
            scheduler="cosine",
            loss="label_smoothing",
            activation="relu",
            filters=(32, 64, 128),
            batch_size=128,
        ),
        "quality": 0.78,
        "epochs_run": 4,
        "status": "STOPPED",
    },
    {
        "config": dict(
            optimizer="adam",
            lr=5e-2,
            scheduler="none",
            loss="cross_entropy",
            activation="relu",
            filters=(64, 128, 256),
            batch_size=64,
            batchnorm=False,
        ),
        "quality": 0.30,
        "epochs_run": 1,
        "status": "STOPPED",
        "exploding": True,
    },
    {
        "config": dict(
            model="vgg_a", optimizer="adam", lr=1e-3, scheduler="cosine", loss="cross_entropy", batch_size=128
        ),
        "quality": 0.82,
        "epochs_run": 6,
        "status": "TERMINATED",
    },
    {
        "config": dict(
            optimizer="adam",
            lr=1e-3,
            scheduler="none",
            loss="mse",
            activation="elu",
            filters=(64, 128, 256),
            batch_size=64,
        ),
        "quality": 0.60,
        "epochs_run": 1,
        "status": "ERROR",
    },
]
MAX_EPOCHS = 6


def _layer_rows(trial: dict[str, Any], epoch: int) -> list[dict[str, Any]]:
    rows = []
    for depth, (name, numel) in enumerate(LAYERS.items()):
        grad = 1e-3 * (0.7**depth) / epoch
        if trial.get("vanishing") and "conv1" in name:
            grad = 1e-11  # gradient L2 of ~3e-10: far below the 1e-7 vanishing threshold
        if trial.get("exploding") and "fc1" in name:
            grad = 5.0
        grad_l2 = grad * math.sqrt(numel)
        weight_l2 = 0.05 * math.sqrt(numel) * (1 + 0.05 * epoch)
        update_l2 = weight_l2 * 0.1 / epoch
        kind = "norm" if ".bn" in name else "weight" if name.endswith("weight") else "bias"
        rows.append(
            {
                "epoch": epoch,
                "layer": name,
                "layer_index": depth,
                "kind": kind,
                "numel": numel,
                "grad_mean_abs": grad,
                "grad_max_abs": 8 * grad,
                "grad_l2": grad_l2,
                "weight_l2": weight_l2,
                "update_l2": update_l2,
                "update_ratio": update_l2 / weight_l2,
                "health": layer_health(grad_l2, kind),
            }
        )
    return rows


def make_fake_study(root: Path, trials: list[dict[str, Any]] = FAKE_TRIALS) -> Path:
    """Ten trials of a fictitious ASHA study (rungs 1, 2, 4 of 6 epochs), one of them an ERROR.

    What the real smoke study cannot show reliably: a VGG-A (inactive activation), a numeric grid
    (batch_size), vanishing and exploding gradients, an errored trial.
    """
    folder = root / "fake_study"
    tables = TableWriter.open(folder)
    for i, trial in enumerate(trials):
        config = cfg.TrainConfig(epochs=MAX_EPOCHS, **trial["config"])
        trial_id = f"t{i:02d}"
        record = tables.record(trial_id)
        epochs, healths = [], set()
        for epoch in range(1, trial["epochs_run"] + 1):
            val = trial["quality"] * (1 - 0.55 * math.exp(-epoch / 1.5)) + 0.004 * ((i + epoch) % 3)
            epochs.append(
                {
                    "epoch": epoch,
                    "train_loss": 2.3 * (1 - 0.6 * val),
                    "train_acc": val + 0.02,
                    "val_loss": 2.3 * (1 - 0.55 * val),
                    "val_acc": val,
                    "lr": config.lr,
                    "lr_last": config.lr,
                    "seconds": 10.0,
                    "images_per_s": 900.0,
                }
            )
            layers = _layer_rows(trial, epoch)
            healths |= {row["health"] for row in layers}
            record.add("layers", layers)
        record.add("epochs", epochs)
        best = max(epochs, key=lambda row: row["val_acc"])
        record.trial = {
            "study": "fake",
            **cfg.to_row(config),
            "status": trial["status"],
            "stop_reason": {"TERMINATED": "completed", "STOPPED": "asha", "ERROR": "error: RuntimeError"}[
                trial["status"]
            ],
            "epochs_run": trial["epochs_run"],
            "best_val_acc": None if trial["status"] == "ERROR" else best["val_acc"],
            "best_epoch": None if trial["status"] == "ERROR" else best["epoch"],
            "final_val_acc": epochs[-1]["val_acc"],
            "macs": 150_000_000 if config.model == "vgg_a" else 10_000_000 * config.filters[0] // 8,
            "params": 9_750_922 if config.model == "vgg_a" else 40_000 * config.filters[0],
            "grad_health": _study_health(healths),
            "data": "synthetic",
            "train_images": 2000,
            "node": "test",
            "device": "cpu",
            "wall_s": 10.0 * trial["epochs_run"],
        }
        tables.write()
    tables.compact()
    write_plan(folder, grace_period=1, reduction_factor=2)
    return folder


def write_plan(folder: Path, grace_period: int | None, reduction_factor: int = 2) -> None:
    """The study's stored plan and space copy, as ``tune_cifar.search`` leaves them (ASHA at
    ``grace_period``, none when None), for a study built here from fabricated rows."""
    study = StudyFolder(folder)
    asha = f"{{grace_period: {grace_period}, reduction_factor: {reduction_factor}}}" if grace_period else "null"
    study.space.write_text(
        f"description: fabricated\nnum_samples: 10\nmax_epochs: {MAX_EPOCHS}\ndata: {{source: synthetic}}\n"
        f"asha: {asha}\nfixed: {{}}\nparams: {{lr: {{loguniform: [1.0e-4, 1.0e-1]}}}}\n"
    )
    plan = StudyPlan(name=folder.name, space_file=str(study.space), num_samples=10, max_epochs=MAX_EPOCHS,
                     data="synthetic", subset=None, val_size=None, seed=0, wandb="disabled",
                     grace_period=grace_period)  # fmt: skip
    plan.with_space(load_space(study.space)).save(study)


def _study_health(healths: set[str]) -> str:
    return "exploding" if "exploding" in healths else "vanishing" if "vanishing" in healths else "ok"


def make_fake_bn_study(root: Path, steps_per_epoch: int = 40, epochs: int = 4, probe_every: int = 4) -> Path:
    """The BN-landscape grid with fabricated steps: BN trains faster and has the smoother landscape."""
    folder = root / "fake_bn"
    tables = TableWriter.open(folder)
    rng = np.random.default_rng(0)
    for bn in (True, False):
        for lr in (1e-3, 2e-3, 1e-4, 5e-4):
            config = cfg.TrainConfig(
                model="vgg_a",
                batchnorm=bn,
                optimizer="adam",
                lr=lr,
                batch_size=128,
                epochs=epochs,
                probe_every=probe_every,
            )
            trial_id = f"vgg_{'bn' if bn else 'nobn'}_lr{lr:g}"
            record = tables.record(trial_id)
            speed = (3.0 if bn else 1.0) * (lr / 1e-3) ** 0.5
            spread = 0.1 if bn else 0.6
            steps, epoch_rows = [], []
            for step in range(1, steps_per_epoch * epochs + 1):
                loss = 2.3 * math.exp(-speed * step / 200) + 0.2 + spread * 0.2 * rng.random()
                row = {"step": step, "epoch": (step - 1) // steps_per_epoch + 1, "train_loss": loss, "lr": lr}
                if step % probe_every == 0:
                    low = loss * (1 - 0.05 * spread * rng.random())
                    row |= {
                        "probe_loss_min": low,
                        "probe_loss_max": loss * (1 + spread * (0.5 + rng.random())),
                        "probe_grad_change": spread * (1 + rng.random()),
                        "probe_beta": spread * 20 * (1 + rng.random()),
                    }
                steps.append(row)
            for epoch in range(1, epochs + 1):
                val = 0.1 + 0.85 * (1 - math.exp(-speed * epoch / 4))
                epoch_rows.append(
                    {
                        "epoch": epoch,
                        "train_loss": 1.0,
                        "train_acc": val,
                        "val_loss": 1.0,
                        "val_acc": val,
                        "lr": lr,
                        "seconds": 1.0,
                        "images_per_s": 100.0,
                    }
                )
                record.add("layers", _layer_rows({}, epoch))
            record.add("steps", steps)
            record.add("epochs", epoch_rows)
            best = max(epoch_rows, key=lambda row: row["val_acc"])
            record.trial = {
                "study": "bn_landscape",
                **cfg.to_row(config),
                "status": "TERMINATED",
                "stop_reason": "completed",
                "epochs_run": epochs,
                "best_val_acc": best["val_acc"],
                "best_epoch": best["epoch"],
                "final_val_acc": epoch_rows[-1]["val_acc"],
                "macs": 153_000_000,
                "params": 9_750_922 if not bn else 9_756_426,
                "grad_health": "ok",
                "data": "synthetic",
                "train_images": 5120,
                "node": "test",
                "device": "cpu",
                "wall_s": 5.0,
            }
            tables.write()
    tables.compact()
    return folder


# -- real studies: the project's own commands on synthetic data -----------------------------------
def _run(command: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


SMOKE_CONSOLE = "smoke-console.txt"  # beside the smoke study: what its user saw (stdout, then stderr)


@pytest.fixture(scope="session")
def smoke_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke study (8 TPE trials, ASHA, 3 epochs on 640 synthetic images): about 30 s.

    Run as a user runs it, without RAY_AUTH_MODE (what decides whether Ray warns about tokens).
    """
    storage = tmp_path_factory.mktemp("studies")
    env = {key: value for key, value in os.environ.items() if key != "RAY_AUTH_MODE"}
    done = _run(
        [
            sys.executable,
            "-m",
            "tune_cifar.search",
            "--space",
            "smoke",
            "--data",
            "synthetic",
            "--name",
            "smoke",
            "--storage-path",
            str(storage),
            "--wandb",
            "disabled",
        ],
        timeout=300,
        env=env,
    )
    (storage / SMOKE_CONSOLE).write_text(done.stdout + done.stderr)
    return storage / "smoke"


@pytest.fixture(scope="session")
def bn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A miniature BN landscape study trained by the real engine: a narrow conditioned CNN with and without BN
    at two learning rates, 2 epochs of 8 steps with a probe every 2 steps, written as a study's tables.

    In-process (as ``tune_cifar.train`` drives the Trainer) rather than four subprocesses: one torch import
    and one synthetic data set instead of four keeps it to a few seconds.
    """
    from tune_cifar.data import load_splits
    from tune_cifar.engine import Trainer

    folder = tmp_path_factory.mktemp("bn") / "bn_study"
    tables = TableWriter.open(folder)
    splits = load_splits("synthetic", val_size=128, subset=640)
    for bn in (True, False):
        for lr in (2e-3, 1e-4):
            config = cfg.TrainConfig(
                model="conditioned_cnn",
                filters=(8, 16, 32),
                batchnorm=bn,
                optimizer="adam",
                lr=lr,
                batch_size=64,
                augment=False,
                epochs=2,
                probe_every=2,
            )
            trainer = Trainer(config, splits)
            record = tables.record(f"{'bn' if bn else 'nobn'}_lr{lr:g}")
            while trainer.epoch < config.epochs:
                report = trainer.train_epoch()
                record.add("epochs", [report.epoch])
                record.add("layers", report.layers)
                record.add("steps", report.steps)
            record.trial = {
                "study": "bn_mini",
                **cfg.to_row(config),
                **trainer.finish(),
                "status": "TERMINATED",
                "stop_reason": "completed",
                "wall_s": 1.0,
            }
            tables.write()
    tables.compact()
    return folder


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_study(tmp_path_factory.mktemp("fake"))


@pytest.fixture(scope="module")
def fake_bn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_bn_study(tmp_path_factory.mktemp("fake_bn"))


def run_script(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "analysis" / script), *args], capture_output=True, text=True, cwd=REPO, timeout=300
    )


def test_analysis_is_a_package_that_imports_neither_torch_nor_ray(fake_dir: Path) -> None:
    """12.3: every analysis module imports without torch or Ray, and runs as ``python -m`` from any
    folder (no sys.path inserts: the project installs it as ``tune_cifar.analysis``)."""
    modules = ["_study", "best_config", "bn_landscape", "gradient_flow", "results", "search_views"]
    probe = "import sys\n" + "".join(f"import tune_cifar.analysis.{name}\n" for name in modules)
    probe += "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd="/", timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
    as_module = subprocess.run([sys.executable, "-m", "tune_cifar.analysis.gradient_flow", str(fake_dir)],
                               capture_output=True, text=True, cwd="/", timeout=300)  # fmt: skip
    assert as_module.returncode == 0, as_module.stderr[-2000:]
    assert not any("sys.path" in path.read_text() for path in (REPO / "analysis").glob("*.py"))


def parquet(folder: Path, name: str) -> pd.DataFrame:
    """The table as a user would read it, independently of the analysis code."""
    return pd.read_parquet(folder / name)


def finished(folder: Path) -> pd.DataFrame:
    trials = parquet(folder, "trials")
    return trials[trials["status"].isin(["TERMINATED", "STOPPED"])]


# -- what a study prints ---------------------------------------------------------------------------
def test_a_local_study_prints_no_ray_token_warning_and_its_final_line_once(smoke_dir: Path) -> None:
    console = (smoke_dir.parent / SMOKE_CONSOLE).read_text()
    assert "Token authentication" not in console, console[-3000:]
    progress = [line.split("] ", 1)[1] for line in console.splitlines() if re.match(r"\[\d+:\d\d:\d\d\] ", line)]
    assert progress and progress[-1].startswith("0 running, 0 pending, ")
    assert progress.count(progress[-1]) == 1, progress[-3:]  # the final state, printed once
    assert re.search(rf"^optuna: \S*python\S* -m tune_cifar\.dashboard {re.escape(str(smoke_dir))} ", console, re.M)


# -- best_config ---------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["smoke_dir", "fake_dir"])
def test_leaderboard_is_finished_trials_by_best_val_acc(which: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(which)
    done = finished(folder)
    board = best_config.leaderboard(_study.load_study(folder), top=5)
    expected = done.sort_values("best_val_acc", ascending=False).head(5)
    assert list(board["best_val_acc"]) == list(expected["best_val_acc"])
    assert list(board["rank"]) == list(range(1, len(board) + 1))
    for row in board.itertuples():
        source = done[done["trial_id"] == row.trial_id].iloc[0]
        assert (row.epochs_run, row.status, row.macs) == (source["epochs_run"], source["status"], source["macs"])
    assert "ERROR" not in set(board["status"]) and "RUNNING" not in set(board["status"])


def test_smoke_study_has_asha_stops(smoke_dir: Path) -> None:
    """The real study is a fair test bed: ASHA stopped some trials and several factors vary."""
    trials = parquet(smoke_dir, "trials")
    assert (trials["status"] == "STOPPED").any() and (trials["status"] == "TERMINATED").any()
    assert {"optimizer", "loss", "scheduler"} <= set(_study.factors(finished(smoke_dir)))


def at_budget(folder: Path, epochs: int) -> pd.DataFrame:
    """Finished trials that ran ``epochs`` epochs or more, with their val_acc after exactly that many (from Parquet)."""
    done = finished(folder)
    rows = parquet(folder, "epochs")
    values = rows[rows["epoch"] == epochs].set_index("trial_id")["val_acc"]
    reached = done[done["epochs_run"] >= epochs]
    return reached.assign(val_acc=reached["trial_id"].map(values))


def budgets(folder: Path) -> list[int]:
    return sorted(int(e) for e in finished(folder)["epochs_run"].unique())


@pytest.mark.parametrize("which", ["smoke_dir", "fake_dir"])
def test_factor_tables_compare_trials_at_equal_budgets(which: str, request: pytest.FixtureRequest) -> None:
    """Every number rests on trials of one budget: the old tables pooled 1-epoch and 3-epoch trials."""
    folder = request.getfixturevalue(which)
    study = _study.load_study(folder)
    names = _study.factors(study.finished)
    assert names[: len(_study.MAIN_FACTORS)] == [f for f in _study.MAIN_FACTORS if f in names]
    assert len(budgets(folder)) >= 2  # ASHA stopped some trials: there is something to keep apart
    for factor in names:
        table = best_config.factor_table(study, factor)
        assert sorted(table["epochs"].unique()) == budgets(folder)
        for epochs, rows in table.groupby("epochs"):
            at = at_budget(folder, epochs)
            active = at[at[factor].notna()]
            assert rows["trials"].sum() == len(active)  # inactive trials are not a level
            for row in rows.itertuples():
                level = active[active[factor].map(_study.native) == getattr(row, factor)]
                assert row.trials == len(level)
                assert row.mean_val_acc == pytest.approx(level["val_acc"].mean())
                if len(level) > 1:
                    assert row.std_val_acc == pytest.approx(level["val_acc"].std(ddof=1))
                else:
                    assert pd.isna(row.std_val_acc)
                assert row.best_val_acc == level["val_acc"].max()
                assert row.best_trial == level.loc[level["val_acc"].idxmax(), "trial_id"]
            assert list(rows["mean_val_acc"]) == sorted(rows["mean_val_acc"], reverse=True)


def test_fake_factors_cover_grids_and_inactive_levels(fake_dir: Path) -> None:
    study = _study.load_study(fake_dir)
    names = _study.factors(study.finished)
    assert "batch_size" in names  # a numeric grid (64/128, each tried several times)
    assert "lr" not in names  # sampled continuously
    activation = best_config.factor_table(study, "activation")
    first = activation[activation["epochs"] == 1]
    assert first["trials"].sum() == 8  # the VGG-A trial has no activation choice: left out
    last = activation[activation["epochs"] == MAX_EPOCHS]
    assert last["trials"].sum() == 3  # only the trials that ran all 6 epochs (the VGG-A among the four)


@pytest.mark.parametrize("which", ["smoke_dir", "fake_dir"])
def test_pareto_front_is_the_non_dominated_trials_of_the_full_budget(
    which: str, request: pytest.FixtureRequest
) -> None:
    folder = request.getfixturevalue(which)
    epochs, front = best_config.pareto_front(_study.load_study(folder))
    assert epochs == budgets(folder)[-1]
    done = at_budget(folder, epochs)
    assert set(front["trial_id"]) <= set(done["trial_id"])  # no ASHA-stopped trial on the front

    def dominated(row: pd.Series) -> bool:
        better = (done["macs"] <= row["macs"]) & (done["val_acc"] >= row["val_acc"])
        strictly = (done["macs"] < row["macs"]) | (done["val_acc"] > row["val_acc"])
        return bool((better & strictly).any())

    on_front = set(front["trial_id"])
    assert on_front and not any(dominated(row) for _, row in front.iterrows())
    assert all(
        dominated(row) or _ties_front(row, front) for _, row in done.iterrows() if row["trial_id"] not in on_front
    )
    assert done["val_acc"].max() == front["val_acc"].max()


def test_pareto_plot_marks_asha_stopped_trials(fake_dir: Path) -> None:
    ax = best_config.plot_pareto(_study.load_study(fake_dir)).axes[0]
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert any("stopped by ASHA" in label for label in labels)
    assert f"after {MAX_EPOCHS} epochs" in ax.get_title()


def _ties_front(row: pd.Series, front: pd.DataFrame) -> bool:
    return bool(((front["macs"] == row["macs"]) & (front["val_acc"] == row["val_acc"])).any())


def test_importance_rests_on_one_budget_and_says_so(fake_dir: Path) -> None:
    study = _study.load_study(fake_dir)
    ranking = best_config.importance(study, min_trials=5)
    # budgets hold 9, 7, 6 and 4 finished trials: the longest with at least 5 is 4 epochs
    assert "after 4 epochs of the 6 finished trials" in ranking.statement and "PedAnova" in ranking.statement
    scores = ranking.scores
    assert (scores >= 0).all() and scores.sum() == pytest.approx(1.0)
    assert list(scores) == sorted(scores, reverse=True)
    assert set(scores.index) <= set(study.varying(study.at_budget(4)))


def test_importance_optuna_trials_leave_inactive_params_out(fake_dir: Path) -> None:
    study = _study.load_study(fake_dir)
    at = study.at_budget(1)
    distributions = {key: best_config.distribution(key, at[key]) for key in study.varying(at)}
    optuna_run = best_config.optuna_study(at, distributions)
    vgg = next(t for t in optuna_run.trials if t.user_attrs["trial_id"] == "t08")
    assert "activation" not in vgg.params and "filters" not in vgg.params
    assert [t.value for t in optuna_run.trials] == list(at["val_acc"])


def test_importance_is_not_drawn_from_too_few_trials(fake_dir: Path) -> None:
    ranking = best_config.importance(_study.load_study(fake_dir))  # 9 trials at most share a budget
    assert ranking.scores is None and "at most 9 finished trials share a budget" in ranking.statement


def test_importance_agrees_with_optuna_on_the_persisted_study(smoke_dir: Path) -> None:
    """The report's ranking is what ``optuna.importance`` says about ``optuna.db``, same evaluator and trials."""
    import optuna

    study = _study.load_study(smoke_dir)
    ranking = best_config.importance(study, min_trials=5)
    assert ranking.scores is not None
    epochs = max(b for b in budgets(smoke_dir) if len(at_budget(smoke_dir, b)) >= 5)  # the longest with 5 trials
    assert f"after {epochs} epochs of the {len(at_budget(smoke_dir, epochs))} finished" in ranking.statement
    persisted = optuna.load_study(study_name="smoke", storage=f"sqlite:///{smoke_dir / 'optuna.db'}")
    finished_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    same = [
        optuna.trial.create_trial(value=t.intermediate_values[epochs], params=t.params, distributions=t.distributions)
        for t in persisted.get_trials(states=finished_states)
        if epochs in t.intermediate_values
    ]
    replay = optuna.create_study(direction="maximize")
    replay.add_trials(same)
    quantile = best_config.importance_quantile(len(same))
    with warnings.catch_warnings():  # PED-ANOVA warns about sparse regimes, as in the report (which silences it)
        warnings.simplefilter("ignore")
        expected = optuna.importance.get_param_importances(
            replay,
            evaluator=optuna.importance.PedAnovaImportanceEvaluator(target_quantile=quantile),
            params=list(ranking.scores.index),
        )
    assert len(same) == len(at_budget(smoke_dir, epochs))
    assert dict(ranking.scores) == pytest.approx(expected)


def test_best_config_cli_writes_report_and_plots(smoke_dir: Path) -> None:
    default = run_script("best_config.py", str(smoke_dir), "--top", "3")
    assert default.returncode == 0, default.stderr
    assert (
        "Not computed: at most 8 finished trials share a budget" in (smoke_dir / "analysis" / "report.md").read_text()
    )
    assert not (smoke_dir / "analysis" / "importance.png").exists()  # no noise drawn
    done = run_script("best_config.py", str(smoke_dir), "--top", "3", "--min-importance-trials", "5")
    assert done.returncode == 0, done.stderr
    best = finished(smoke_dir).sort_values("best_val_acc", ascending=False).iloc[0]
    report = (smoke_dir / "analysis" / "report.md").read_text()
    assert f"| 1 | {best['trial_id']} | {100 * best['best_val_acc']:.2f}% |" in report
    assert "## Factors" in report and "### optimizer" in report and "91.53%" in report
    for name in ("pareto", "learning_curves", "asha", "parallel", "importance"):
        png = smoke_dir / "analysis" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_retrain_trains_on_train_plus_val_and_tests_once(fake_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "study"
    shutil.copytree(fake_dir, folder)
    done = run_script("best_config.py", str(folder), "--retrain", "--epochs", "1", "--subset", "200")
    assert done.returncode == 0, done.stderr
    result = json.loads((folder / "retrain" / "result.json").read_text())
    row = parquet(folder / "retrain", "trials").iloc[0]
    assert result["source_trial"] == "t00" and result["epochs"] == 1 == row["epochs_run"]
    assert result["test_acc"] == row["test_acc"] and 0 <= result["test_acc"] <= 1
    assert result["train_images"] == row["train_images"] == 200  # validation folded into training
    assert pd.isna(row["best_val_acc"])  # nothing left to validate on
    assert result["reference_test_acc"] == 0.9153 and (folder / "retrain" / "model.pt").stat().st_size > 0
    assert result["config"]["loss"] == "label_smoothing" and result["config"]["filters"] == "64,128,256"
    report = (folder / "analysis" / "report.md").read_text()
    assert f"test accuracy {100 * result['test_acc']:.2f}%" in report and "91.53%" in report
    again = run_script("best_config.py", str(folder), "--retrain", "--epochs", "1")
    assert again.returncode == 2 and "already holds a retrain" in again.stderr


def test_search_views_show_the_epochs_table(fake_dir: Path) -> None:
    study = _study.load_study(fake_dir)
    assert study.rungs == (1, 2, 4)  # the fictitious ASHA's plan: grace 1, factor 2, 6 epochs
    epochs = parquet(fake_dir, "epochs")
    curves = search_views.plot_learning_curves(study, top=3).axes[0]
    for line, trial_id in zip(curves.lines, study.finished["trial_id"].head(3), strict=True):
        curve = epochs[epochs["trial_id"] == trial_id].sort_values("epoch")
        np.testing.assert_allclose(line.get_ydata(), 100 * curve["val_acc"])
    asha = search_views.plot_asha(study).axes[1]  # trials per epochs-run bar chart
    heights = {(round(bar.get_x() + bar.get_width() / 2), bar.get_height()) for bar in asha.patches if bar.get_height()}
    assert heights == {(1, 2), (2, 1), (4, 2), (6, 4)}  # STOPPED at 1, 2, 4; TERMINATED at 6 (the ERROR left out)


# -- gradient flow -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "column, plot", [("grad_mean_abs", "plot_gradient_flow"), ("update_ratio", "plot_update_ratio")]
)
def test_gradient_flow_figure_is_the_layers_table(smoke_dir: Path, column: str, plot: str) -> None:
    study = _study.load_study(smoke_dir)
    trial_id = study.best_trial_id()
    layers = parquet(smoke_dir, "layers")
    layers = layers[layers["trial_id"] == trial_id]
    fig = getattr(gradient_flow, plot)(study, trial_id)
    ax = fig.axes[0]
    names = [tick.get_text() for tick in ax.get_xticklabels()]
    assert names[:3] == ["conv1", "conv2", "conv3"] and names[-1] == "fc3"  # forward order, weights only
    epochs = sorted(layers["epoch"].unique())
    assert len(ax.lines) == len(epochs)
    for line, epoch in zip(ax.lines, epochs, strict=True):
        rows = layers[layers["epoch"] == epoch].set_index("layer")
        expected = [
            rows.loc[f"{'features' if n.startswith('conv') else 'classifier'}.{n}.weight", column] for n in names
        ]
        np.testing.assert_array_equal(line.get_ydata(), expected)
    assert ax.get_yscale() == "log"


def test_health_table_matches_trials_and_layers(fake_dir: Path) -> None:
    study = _study.load_study(fake_dir)
    table = gradient_flow.health_table(study).set_index("trial_id")
    trials = parquet(fake_dir, "trials")
    assert set(table.index) == set(trials[trials["grad_health"] != "ok"]["trial_id"]) == {"t04", "t07"}
    layers = parquet(fake_dir, "layers")
    for trial_id, row in table.iterrows():
        flagged = layers[(layers["trial_id"] == trial_id) & (layers["health"] != "ok")]
        assert row["vanishing layer-epochs"] == (flagged["health"] == "vanishing").sum()
        assert row["exploding layer-epochs"] == (flagged["health"] == "exploding").sum()
    assert table.loc["t04", "grad_health"] == "vanishing" and table.loc["t07", "grad_health"] == "exploding"
    by_factor = gradient_flow.health_by_factor(study).set_index(["factor", "level"])
    assert by_factor.loc[("batchnorm", "false"), ["trials", "vanishing", "exploding"]].tolist() == [2, 1, 1]


def test_health_text_agrees_with_the_health_column(fake_dir: Path, tmp_path: Path) -> None:
    """The report counts what the flags say: a bias with a near-zero gradient is not "vanishing"."""
    folder = tmp_path / "study"
    shutil.copytree(fake_dir, folder)
    layers = parquet(folder, "layers")
    tiny = layers[layers["grad_l2"] < 1e-7]
    assert set(tiny["kind"]) == {"weight", "bias"}  # the fixture has both: conv1's kernel and its bias
    assert (tiny[tiny["kind"] == "bias"]["health"] == "ok").all()
    flagged = layers[layers["health"] == "vanishing"]
    assert set(flagged["kind"]) == {"weight"}
    study = _study.load_study(folder)
    gradient_flow.write_report(study, "t00")
    text = (folder / "analysis" / "gradient_flow.md").read_text()
    vanishing_trials = flagged["trial_id"].nunique()
    assert f"{vanishing_trials} of {len(study.trials)} trials had vanishing gradients in a weight tensor" in text
    assert "some parameter tensor" not in text


def test_parallel_coordinates_compare_at_the_first_budget_and_dash_stopped_trials(fake_dir: Path) -> None:
    study = _study.load_study(fake_dir)
    ax = search_views.plot_parallel_coordinates(study).axes[0]
    first = budgets(fake_dir)[0]
    assert f"{len(at_budget(fake_dir, first))} finished trials at {first} epochs" in ax.get_title()
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    stopped_later = at_budget(fake_dir, first)["status"].eq("STOPPED").sum()
    assert len(dashed) == stopped_later > 0


def test_loss_panel_clips_a_diverged_trial_and_names_it(fake_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "study"
    shutil.copytree(fake_dir, folder)
    epochs = parquet(folder, "epochs")
    diverged = epochs["trial_id"] == "t00"  # the best trial: always among the curves drawn
    epochs.loc[diverged & (epochs["epoch"] == 3), "val_loss"] = 3517.0
    shutil.rmtree(folder / "epochs")
    (folder / "epochs").mkdir()
    epochs.to_parquet(folder / "epochs" / "part-all.parquet")
    loss_ax = search_views.plot_learning_curves(_study.load_study(folder), top=5).axes[1]
    healthy = epochs[~diverged & epochs["trial_id"].isin(_study.load_study(folder).finished["trial_id"].head(5))]
    top = max(healthy["val_loss"].max(), healthy["train_loss"].max())
    assert loss_ax.get_ylim()[1] == pytest.approx(1.1 * top)  # the others fill the panel
    assert "clipped, diverged: #1 t00 (up to 3.52e+03)" in loss_ax.get_title()
    assert loss_ax.get_legend() is not None


def test_gradient_flow_cli(smoke_dir: Path) -> None:
    trial_id = parquet(smoke_dir, "trials")["trial_id"].iloc[-1]
    done = run_script("gradient_flow.py", str(smoke_dir), "--trial", trial_id)
    assert done.returncode == 0, done.stderr
    assert (smoke_dir / "analysis" / f"gradient_flow_{trial_id}.png").stat().st_size > 0
    assert (smoke_dir / "analysis" / f"update_ratio_{trial_id}.png").stat().st_size > 0
    assert "## Gradient health across the study" in (smoke_dir / "analysis" / "gradient_flow.md").read_text()


# -- bad input: one line, exit 2 -----------------------------------------------------------------
def _without(folder: Path, target: Path, table: str) -> Path:
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns(table))
    return target


def _all_running(folder: Path, target: Path) -> Path:
    target = target / "s"
    shutil.copytree(folder, target)
    trials = parquet(target, "trials").assign(status="RUNNING", best_val_acc=None)
    shutil.rmtree(target / "trials")
    (target / "trials").mkdir()
    trials.to_parquet(target / "trials" / "part-all.parquet")
    return target


@pytest.mark.parametrize(
    "script, make, extra, message",
    [
        ("best_config.py", lambda f, t: t / "missing", [], "not a study folder"),
        ("best_config.py", lambda f, t: t, [], "not a study folder"),
        ("best_config.py", _all_running, [], "no finished trials"),
        ("best_config.py", lambda f, t: _without(f, t / "s", "epochs"), [], "no epochs table"),
        ("best_config.py", lambda f, t: f, ["--top", "0"], "--top must be at least 1"),
        ("best_config.py", lambda f, t: f, ["--min-importance-trials", "1"], "--min-importance-trials must be at"),
        ("best_config.py", lambda f, t: f, ["--epochs", "3"], "only apply with --retrain"),
        ("best_config.py", lambda f, t: f, ["--bogus"], "unrecognized arguments"),
        ("gradient_flow.py", lambda f, t: f, ["--trial", "no-such-trial"], "no trial 'no-such-trial'"),
        ("gradient_flow.py", lambda f, t: _without(f, t / "s", "layers"), [], "no layers table"),
        ("gradient_flow.py", _all_running, [], "no finished trials"),
        ("bn_landscape.py", lambda f, t: f, [], "no steps table"),
        ("bn_landscape.py", lambda f, t: t / "missing", [], "not a study folder"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    fake_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    script: str,
    make: Any,
    extra: list[str],
    message: str,
) -> None:
    """In-process through ``cli.run`` (the scripts' own entry), so a dozen cases cost no interpreter start-ups."""
    folder = make(fake_dir, tmp_path)
    module = {"best_config.py": best_config, "gradient_flow.py": gradient_flow, "bn_landscape.py": bn_landscape}[script]
    with pytest.raises(SystemExit) as exited:
        cli.run(module.main, [str(folder), *extra])
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err


@pytest.mark.parametrize("script", ["best_config.py", "gradient_flow.py", "bn_landscape.py"])
def test_scripts_exit_2_from_the_shell(script: str, tmp_path: Path) -> None:
    done = run_script(script, str(tmp_path / "nowhere"))
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nowhere'}: not a study folder (no such directory)"
    ]


# -- BN landscape ----------------------------------------------------------------------------------
def test_bn_landscape_space_is_the_assignment_grid() -> None:
    from tune_cifar import spaces

    space = spaces.load("bn_landscape")
    configs = [space.trial_config({**space.constants(), **point}) for point in space.grid_points()]
    assert sorted((c.batchnorm, c.lr) for c in configs) == sorted(
        (bn, lr) for bn in (True, False) for lr in (1e-3, 2e-3, 1e-4, 5e-4)
    )
    assert {(c.model, c.optimizer, c.batch_size) for c in configs} == {("vgg_a", "adam", 128)}
    assert all(c.probe_every > 0 for c in configs) and space.asha is None


def test_real_probe_values_are_finite_and_positive(bn_dir: Path) -> None:
    steps = parquet(bn_dir, "steps")
    assert set(steps["trial_id"]) == set(parquet(bn_dir, "trials")["trial_id"]) and len(steps["trial_id"].unique()) == 4
    probes = steps.dropna(subset=["probe_beta"])
    assert len(probes) == len(steps) // 2  # probe_every 2
    values = probes[list(bn_landscape.PROBES)].to_numpy()
    assert np.isfinite(values).all() and (values > 0).all()
    assert (probes["probe_loss_min"] <= probes["probe_loss_max"]).all()


def test_bn_landscape_on_real_runs(bn_dir: Path) -> None:
    done = run_script("bn_landscape.py", str(bn_dir))
    assert done.returncode == 0, done.stderr
    assert "BN" in done.stdout and "β-smoothness" in done.stdout
    for name in ("bn_landscape_loss", "bn_landscape_smoothness", "bn_landscape_val_acc"):
        assert (bn_dir / "analysis" / f"{name}.png").stat().st_size > 0
    study = _study.load_study(bn_dir)
    steps = bn_landscape.landscape_steps(study)
    band = bn_landscape.loss_band(steps).set_index(["variant", "step"])
    raw = parquet(bn_dir, "steps").merge(parquet(bn_dir, "trials")[["trial_id", "batchnorm"]], on="trial_id")
    for (bn, step), group in raw.groupby(["batchnorm", "step"]):
        row = band.loc[("BN" if bn else "no BN", step)]
        assert (row["loss_min"], row["loss_max"]) == (group["train_loss"].min(), group["train_loss"].max())
        if group["probe_loss_min"].notna().any():
            assert (
                row["probe_min"] == group["probe_loss_min"].min() and row["probe_max"] == group["probe_loss_max"].max()
            )


def test_bn_landscape_tables_on_known_data(fake_bn_dir: Path) -> None:
    study = _study.load_study(fake_bn_dir)
    reach = bn_landscape.first_reach(study).set_index("trial_id")
    epochs = parquet(fake_bn_dir, "epochs")
    for trial_id, row in reach.iterrows():
        above = epochs[(epochs["trial_id"] == trial_id) & (epochs["val_acc"] >= 0.5)]["epoch"]
        assert (pd.isna(row["first_epoch"]) and above.empty) or row["first_epoch"] == above.min()
    assert pd.isna(reach.loc["vgg_nobn_lr0.0001", "first_epoch"])  # never reaches 50%
    table = bn_landscape.summary(bn_landscape.landscape_steps(study), bn_landscape.first_reach(study))
    rows = table.set_index("variant")
    steps = parquet(fake_bn_dir, "steps").merge(parquet(fake_bn_dir, "trials")[["trial_id", "batchnorm"]])
    assert rows.loc["BN", "median β"] == steps[steps["batchnorm"]]["probe_beta"].median()
    sentence = bn_landscape.conclusion(table)
    ratio = rows.loc["no BN", "median β"] / rows.loc["BN", "median β"]
    assert "narrower" in sentence and f"smaller by {ratio:.1f}×" in sentence
    done = run_script("bn_landscape.py", str(fake_bn_dir))
    assert done.returncode == 0 and "not reached" in (fake_bn_dir / "analysis" / "bn_landscape.md").read_text()


# -- the notebook ----------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["smoke_dir", "bn_dir"])
def test_notebook_runs_top_to_bottom(
    which: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nbformat
    from nbclient import NotebookClient

    folder = request.getfixturevalue(which)
    monkeypatch.setenv("STUDY_DIR", str(folder))
    notebook = nbformat.read(REPO / "analysis" / "explore_trials.ipynb", as_version=4)
    assert "parameters" in notebook.cells[1].metadata.get("tags", [])
    client = NotebookClient(
        notebook, kernel_name="python3", timeout=240, resources={"metadata": {"path": str(REPO / "analysis")}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    text = "".join(out.get("text", "") for out in outputs)
    assert len(images) >= 6
    # every figure carries its titles as alternative text (the report's HTML `alt`, `make report`)
    alts = [out.get("metadata", {}).get("image/png", {}).get("alt", "") for out in images]
    assert all(alt and alt != "figure" for alt in alts), alts
    if which == "bn_dir":
        assert len(images) >= 9 and "no steps table" not in text
    else:
        assert "no steps table in this study" in text
        markdown = "".join(out.get("data", {}).get("text/markdown", "") for out in outputs)
        assert "| rung | trials | Spearman ρ with the final ranking | Kendall τ |" in markdown  # ASHA's rungs
