"""Fair comparisons (``tune_cifar.compare``) end to end on real Ray, Optuna and Parquet, and their statistics.

One comparison runs once for the module on synthetic images: 2 optimizers × 3 paired proposals of
(lr, momentum), 2 epochs, then 2 confirmation seeds in both views. The tests read what it left.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.stats import kendalltau, spearmanr
from test_study import REPO, study_env

from tune_cifar import spaces
from tune_cifar.analysis.stats import (
    bootstrap_ci,
    earliest_agreement,
    expected_best,
    paired_difference,
    rank_agreement,
)
from tune_cifar.errors import UsageError
from tune_cifar.proposals import for_level, proposals

K = 3
SEEDS = 2
EPOCHS = 2
SPACE = {
    "description": "a tiny fair comparison",
    "max_epochs": EPOCHS,
    "data": {"source": "synthetic", "subset": 320, "val_size": 64},
    "asha": None,
    "max_concurrent": 2,
    "fixed": {
        "model": "conditioned_cnn",
        "filters": "8,16,32",
        "batch_size": 64,
        "augment": False,
        "precision": "fp32",
        "lr": 0.002,
        "momentum": 0.9,
    },
    "grid": {"optimizer": ["adam", "sgd"]},
    "tune": {
        "trials": K,
        "seeds": SEEDS,
        "params": {"lr": {"loguniform": [1.0e-3, 1.0e-1]}, "momentum": {"uniform": [0.5, 0.95]}},
    },
}


def compare_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tune_cifar.compare", *args]


def write_space(folder: Path, **changes: Any) -> Path:
    raw = {**SPACE, **changes}
    path = folder / "fair.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory, ray_tmp: Path) -> Path:
    root = tmp_path_factory.mktemp("compare")
    space = write_space(root / "spaces")
    args = ("--space", str(space), "--name", "fair", "--storage-path", str(root / "studies"), "--wandb", "disabled")
    done = subprocess.run(compare_cmd(*args), cwd=REPO, env=study_env(ray_tmp), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = root / "studies" / "fair"
    (folder / "command.json").write_text(json.dumps(list(args)))
    return folder


def trials(folder: Path, stage: str) -> pd.DataFrame:
    return pd.read_parquet(folder / stage / "trials")


def test_every_level_runs_the_same_k_proposals_and_inactive_keys_stay_untuned(compared: Path) -> None:
    tuning = trials(compared, "tuning")
    assert len(tuning) == 2 * K
    assert set(tuning["seed"]) == {0}
    assert set(tuning["epochs_run"]) == {EPOCHS}  # no early stopping: selection at the full budget
    lrs = {level: sorted(rows["lr"]) for level, rows in tuning.groupby("optimizer")}
    assert lrs["adam"] == lrs["sgd"] and len(set(lrs["adam"])) == K  # paired: the same K values
    sgd = tuning[tuning["optimizer"] == "sgd"]
    assert sgd["momentum"].notna().all() and sgd["momentum"].nunique() == K
    assert tuning[tuning["optimizer"] == "adam"]["momentum"].isna().all()  # inactive for Adam: not tuned


def test_selection_is_each_levels_best_final_accuracy_with_its_bounds_flagged(compared: Path) -> None:
    tuning = trials(compared, "tuning")
    selection = json.loads((compared / "selection.json").read_text())
    proposed = json.loads((compared / "comparison.json").read_text())["proposals"]
    for level, rows in tuning.groupby("optimizer"):
        top = rows[rows["final_val_acc"] == rows["final_val_acc"].max()]
        order = [p["lr"] for p in proposed[level]]
        best = min(top["lr"], key=lambda lr: min(range(K), key=lambda i: abs(order[i] - lr)))  # ties: earlier
        chosen = selection[level]
        assert chosen["val_acc"] == pytest.approx(rows["final_val_acc"].max())
        assert chosen["values"]["lr"] == pytest.approx(best)
        assert chosen["finished"] == K
        for key, value in chosen["values"].items():
            tried = rows[key]
            expected = "lowest" if value == tried.min() else "highest" if value == tried.max() else None
            assert chosen["at_bound"].get(key) == expected


def test_confirmation_runs_both_views_on_fresh_seeds(compared: Path) -> None:
    confirm = trials(compared, "confirm")
    tuning_seeds = set(trials(compared, "tuning")["seed"])
    assert set(confirm["seed"]) == {1, 2} and not set(confirm["seed"]) & tuning_seeds
    selection = json.loads((compared / "selection.json").read_text())
    for level in ("adam", "sgd"):
        rows = confirm[confirm["optimizer"] == level]
        baseline = rows[np.isclose(rows["lr"], 0.002)]
        assert sorted(baseline["seed"]) == [1, 2]
        tuned = rows[np.isclose(rows["lr"], selection[level]["values"]["lr"])]
        assert sorted(tuned["seed"]) == [1, 2]
    sgd_baseline = confirm[(confirm["optimizer"] == "sgd") & np.isclose(confirm["lr"], 0.002)]
    assert (sgd_baseline["momentum"] == 0.9).all()  # the baseline view holds the fixed value


def test_report_has_both_views_with_budgets_and_the_csv_rows(compared: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "analysis/comparison.py", str(compared), "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "fair.md").read_text()
    for part in (
        "tuning, 256 images × 2 epochs, validated on 64, fp32",
        "Confirmation, 256 images × 2 epochs, validated on 64, fp32: seeds 1, 2",
        "baseline: mean ± std",
        "tuned: mean ± std",
        "Expected best validation accuracy after k",
        "Spearman ρ",
        "The grace period this space supports",
    ):
        assert part in text, part
    assert (tmp_path / "fair_expected_best.png").stat().st_size > 0
    rows = pd.read_csv(tmp_path / "fair.csv")
    required = ["factor", "level", "view", "train_images", "epochs", "tuned", "seeds", "mean", "std", "median",
                "ci_low", "ci_high"]  # fmt: skip
    assert list(rows.columns[: len(required)]) == required
    assert sorted(zip(rows["level"], rows["view"], strict=True)) == [
        ("adam", "baseline"), ("adam", "tuned"), ("sgd", "baseline"), ("sgd", "tuned"),
    ]  # fmt: skip
    confirm = trials(compared, "confirm")
    adam_base = confirm[(confirm["optimizer"] == "adam") & np.isclose(confirm["lr"], 0.002)]["final_val_acc"]
    row = rows[(rows["level"] == "adam") & (rows["view"] == "baseline")].iloc[0]
    assert row["mean"] == pytest.approx(100 * adam_base.mean(), abs=1e-2)
    assert row["seeds"] == 2 and row["epochs"] == EPOCHS and row["train_images"] == 256
    assert set(rows["verdict"]) <= {"best", "tied with the best", "below the best"}


def test_results_md_takes_the_comparison_and_keeps_it_when_the_folder_is_gone(compared: Path, tmp_path: Path) -> None:
    studies, figures, out = tmp_path / "studies", tmp_path / "fig", tmp_path / "RESULTS.md"
    shutil.copytree(compared, studies / "fair_optimizers")
    shutil.copytree(compared, studies / "fair_losses", ignore=shutil.ignore_patterns("confirm"))  # stopped mid-way
    command = [sys.executable, "analysis/results.py", str(studies), "--out", str(out), "--figures", str(figures)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    first = out.read_text()
    assert "Confirmation, 256 images × 2 epochs" in first and "baseline: mean ± std" in first
    assert "](fig/comparisons/fair_optimizers_expected_best.png)" in first
    assert (figures / "comparisons" / "fair_optimizers_expected_best.png").is_file()
    assert "The report (test accuracy, single runs" in first and "tuned view" in first
    assert "### scheduler\n\nNot run yet (`make results DATA_DIR=... CHUNK=2`)" in first
    assert "### loss\n\nIn progress, not reported: " in first and "no confirmation stage yet" in first
    assert "### optimizer at a larger budget\n\nNot run yet" in first
    table = pd.read_csv(figures / "factor_tables.csv")
    assert len(table) == 4 and set(table["factor"]) == {"optimizer"}
    shutil.rmtree(studies / "fair_optimizers")  # another machine, another session: the folder is gone
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Confirmation, 256 images × 2 epochs" in out.read_text()  # carried over from fig/comparisons


def test_running_the_command_again_continues_and_adds_nothing(compared: Path, ray_tmp: Path) -> None:
    before = {stage: len(trials(compared, stage)) for stage in ("tuning", "confirm")}
    args = json.loads((compared / "command.json").read_text())
    done = subprocess.run(compare_cmd(*args), cwd=REPO, env=study_env(ray_tmp), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert {stage: len(trials(compared, stage)) for stage in ("tuning", "confirm")} == before
    changed = [*args, "--tuning-trials", "5"]
    refused = subprocess.run(compare_cmd(*changed), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "started with trials = 3" in refused.stderr


def test_selected_from_confirms_another_selection_at_a_new_budget(
    compared: Path, tmp_path: Path, ray_tmp: Path
) -> None:
    space = write_space(tmp_path / "spaces")
    storage = tmp_path / "studies"
    args = ("--space", str(space), "--name", "again", "--storage-path", str(storage), "--wandb", "disabled",
            "--selected-from", str(compared), "--views", "tuned", "--max-epochs", "1", "--seed", "3")  # fmt: skip
    done = subprocess.run(compare_cmd(*args), cwd=REPO, env=study_env(ray_tmp), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    folder = storage / "again"
    assert not (folder / "tuning").exists()
    selection = json.loads((compared / "selection.json").read_text())
    confirm = trials(folder, "confirm")
    assert len(confirm) == 2 * SEEDS and set(confirm["epochs_run"]) == {1}
    assert set(confirm["seed"]) == {4, 5}  # --seed 3: the next S seeds
    assert json.loads((folder / "confirm" / "study.json").read_text())["seed"] == 3  # the stage's split
    for level, rows in confirm.groupby("optimizer"):
        assert np.allclose(rows["lr"], selection[level]["values"]["lr"])  # the tuned view only
    report = subprocess.run([sys.executable, "analysis/comparison.py", str(folder)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert (
        "the selection of `fair`, confirmed at this budget" in report.stdout
        and "256 images × 1 epochs" in report.stdout
    )
    other = write_space(tmp_path / "other", grid={"optimizer": ["adam", "sgd", "adamw"]})
    flags = ("--space", str(other), "--name", "x", "--storage-path", str(storage), "--selected-from", str(compared))
    refused = subprocess.run(compare_cmd(*flags), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "levels: ['adam', 'sgd'] there, ['adam', 'sgd', 'adamw'] here" in refused.stderr
    assert not (storage / "x").exists()


def test_ctrl_c_stops_the_running_stage_and_the_same_command_finishes_it(tmp_path: Path, ray_tmp: Path) -> None:
    import signal
    import time

    space = write_space(tmp_path / "spaces", max_epochs=3)
    storage = tmp_path / "studies"
    args = ("--space", str(space), "--name", "stopped", "--storage-path", str(storage), "--wandb", "disabled")
    driver = subprocess.Popen(compare_cmd(*args), cwd=REPO, env=study_env(ray_tmp), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    epochs = storage / "stopped" / "tuning" / "epochs"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (epochs.is_dir() and any(epochs.iterdir())):
        time.sleep(0.5)
    driver.send_signal(signal.SIGINT)  # to compare alone: it forwards the signal to the stage once
    out, err = driver.communicate(timeout=240)
    assert driver.returncode == 130, out[-2000:] + err[-2000:]
    assert "continue with:" in out.strip().splitlines()[-1] and "tune_cifar.compare" in out.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert not (storage / "stopped" / "confirm").exists()
    done = subprocess.run(compare_cmd(*args), cwd=REPO, env=study_env(ray_tmp), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    tuning = trials(storage / "stopped", "tuning")
    assert len(tuning) == 2 * K and tuning["trial_id"].is_unique and set(tuning["epochs_run"]) == {3}
    assert len(trials(storage / "stopped", "confirm")) == 2 * 2 * SEEDS


@pytest.mark.parametrize(
    ("tune", "flags", "words"),
    [
        ({"params": {"learning_rate": {"loguniform": [1e-3, 1e-1]}}}, [], "tune.params.learning_rate"),
        ({"params": {"optimizer": {"choice": ["adam"]}}}, [], "tune.params.optimizer: also in the grid"),
        ({"trials": 0, "params": {"lr": {"loguniform": [1e-3, 1e-1]}}}, [], "tune.trials"),
        ({"seeds": 1, "params": {"lr": {"loguniform": [1e-3, 1e-1]}}}, [], "tune.seeds"),
        ({"params": {"lr": {"loguniform": [1e-3, 1e-1]}}}, ["--tuning-trials", "0"], "--tuning-trials"),
        ({"params": {"lr": {"loguniform": [1e-3, 1e-1]}}}, ["--confirm-seeds", "1"], "--confirm-seeds"),
        ({"params": {"lr": {"loguniform": [1e-3, 1e-1]}}}, ["--set", "lr=0.1"], "--set lr"),
        ({"params": {"lr": {"loguniform": [1e-3, 1e-1]}}}, ["--seeds", "3"], "--seeds"),
        ({"params": {"lr": {"loguniform": [1e-3, 1e-1]}}}, ["--subset", "99999999"], "subset must be between"),
        ({"params": {"lr": {"loguniform": [1e-3, 1e-1]}}}, ["--max-epochs", "0"], "--max-epochs must be at least 1"),
        (
            {"params": {"scheduler": {"choice": ["step", "none"]}, "step_size": {"int": [1, 3]}}},
            [],
            "tune.params.step_size: its parent scheduler is tuned too",
        ),
    ],
)
def test_bad_input_is_one_line_naming_the_file_and_key_and_writes_nothing(
    tmp_path: Path, tune: dict[str, Any], flags: list[str], words: str
) -> None:
    space = write_space(tmp_path / "spaces", tune=tune)
    storage = tmp_path / "studies"
    done = subprocess.run(compare_cmd("--space", str(space), "--name", "x", "--storage-path", str(storage), *flags),
                          cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], done.stderr
    if flags[:1] != ["--set"] and words.startswith("tune"):
        assert str(space) in lines[0]
    assert not (storage / "x").exists()  # refused by the comparison, or by its first stage at start-up


def test_a_comparison_needs_one_explicit_precision(tmp_path: Path) -> None:
    fixed = {key: value for key, value in SPACE["fixed"].items() if key != "precision"}
    space = write_space(tmp_path / "spaces", fixed=fixed)
    storage = tmp_path / "studies"
    refused = subprocess.run(compare_cmd("--space", str(space), "--name", "x", "--storage-path", str(storage)),
                             cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode == 2 and "--precision" in refused.stderr and "auto" in refused.stderr
    assert not storage.exists()


def test_a_space_without_tune_is_refused_by_compare(tmp_path: Path) -> None:
    raw = {key: value for key, value in SPACE.items() if key != "tune"}
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(raw))
    done = subprocess.run(compare_cmd("--space", str(path), "--name", "x", "--storage-path", str(tmp_path / "s")),
                          cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "no tune: section" in done.stderr


# -- the design and the statistics, without Ray ----------------------------------------------------


def test_one_key_proposals_are_a_log_grid_with_both_bounds() -> None:
    grid = proposals({"lr": spaces.Distribution("loguniform", (1e-4, 1.0))}, 5, seed=0)
    assert [p["lr"] for p in grid] == [1e-4, 1e-3, 1e-2, 1e-1, 1.0]


def test_several_keys_get_k_distinct_values_each_reproducibly() -> None:
    tuned = {
        "lr": spaces.Distribution("loguniform", (1e-4, 1.0)),
        "momentum": spaces.Distribution("uniform", (0.5, 0.99)),
    }
    first, again, other = proposals(tuned, 6, seed=0), proposals(tuned, 6, seed=0), proposals(tuned, 6, seed=1)
    assert first == again and first != other
    for key, (low, high) in (("lr", (1e-4, 1.0)), ("momentum", (0.5, 0.99))):
        values = [p[key] for p in first]
        assert len(set(values)) == 6 and all(low <= v <= high for v in values)
    adam = for_level(first, {"optimizer": "adam"})
    assert adam == [{"lr": p["lr"]} for p in first]  # momentum inactive for Adam


def test_expected_best_matches_a_hand_computed_case() -> None:
    values = [0.1, 0.3, 0.2]
    assert expected_best(values, 1) == pytest.approx(0.2)  # one draw: the mean
    # two draws with replacement: P(max=0.1)=1/9, P(max=0.2)=3/9, P(max=0.3)=5/9
    assert expected_best(values, 2) == pytest.approx(0.1 / 9 + 0.2 * 3 / 9 + 0.3 * 5 / 9)
    assert expected_best(values, 50) == pytest.approx(0.3, abs=1e-8)


def test_rank_agreement_matches_scipy_and_names_the_earliest_epoch() -> None:
    final = pd.Series([0.9, 0.8, 0.7, 0.6, 0.5], index=list("abcde"))
    scores = pd.DataFrame(
        {1: [0.1, 0.5, 0.3, 0.4, 0.2], 2: [0.5, 0.6, 0.4, 0.3, 0.1], 3: [0.8, 0.7, 0.75, 0.5, 0.4]},
        index=list("abcde"),
    )
    table = rank_agreement(scores, final)
    for epoch, row in table.set_index("epoch").iterrows():
        assert row["spearman"] == pytest.approx(spearmanr(scores[epoch], final).statistic)
        assert row["kendall"] == pytest.approx(kendalltau(scores[epoch], final).statistic)
    assert list(table["spearman"] >= 0.7) == [False, True, True]
    assert earliest_agreement(table) == 2
    dipping = pd.DataFrame({"epoch": [1, 2, 3], "spearman": [0.9, 0.5, 0.8]})
    assert earliest_agreement(dipping) == 3  # ρ must stay at or above the threshold from there on
    assert earliest_agreement(pd.DataFrame({"epoch": [1], "spearman": [math.nan]})) is None


def test_paired_difference_uses_shared_seeds_and_bootstrap_is_reproducible() -> None:
    diff = paired_difference({1: 0.5, 2: 0.6, 3: 0.7}, {1: 0.4, 2: 0.5, 4: 0.9})
    assert diff is not None and diff.n == 2 and diff.mean == pytest.approx(0.1)
    assert paired_difference({1: 0.5}, {1: 0.4}) is None
    values = [0.50, 0.52, 0.49, 0.55, 0.51]
    low, high = bootstrap_ci(values)
    assert (low, high) == bootstrap_ci(values) and low < np.mean(values) < high


def test_paired_difference_interval_is_students_t() -> None:
    from scipy.stats import ttest_1samp

    values, reference = {1: 0.52, 2: 0.55, 3: 0.50, 4: 0.56, 5: 0.53}, {1: 0.50, 2: 0.51, 3: 0.50, 4: 0.52, 5: 0.49}
    diff = paired_difference(values, reference)
    expected = ttest_1samp([values[s] - reference[s] for s in values], 0.0).confidence_interval(0.95)
    assert diff is not None and (diff.ci_low, diff.ci_high) == pytest.approx((expected.low, expected.high))


def test_float_levels_match_the_table_as_numbers(tmp_path: Path) -> None:
    from tune_cifar.compare import same_level

    path = tmp_path / "dropout.yaml"
    path.write_text(yaml.safe_dump({"fixed": {"model": "conditioned_cnn"}, "grid": {"dropout": [0, 0.4]}}))
    assert spaces.load(path).grid["dropout"] == (0.0, 0.4)  # 0 as 0.0, as Parquet stores it
    column = pd.Series([0.0, 0.4, None], dtype="float64")
    assert list(same_level(column, 0.0)) == [True, False, False]


def test_points_must_set_every_active_key_and_no_inactive_one(tmp_path: Path) -> None:
    base = {"fixed": {"model": "small_cnn"}, "max_epochs": 1}

    def load(points: Any) -> spaces.Space:
        path = tmp_path / "points.yaml"
        path.write_text(yaml.safe_dump({**base, "points": points}))
        return spaces.load(path)

    space = load([{"optimizer": "sgd", "momentum": 0.5}, {"optimizer": "adam"}])
    assert space.num_samples == 2 and space.grid_points()[1] == {"optimizer": "adam"}
    with pytest.raises(UsageError, match=r"points\[1\]: momentum is active here but not set"):
        load([{"optimizer": "sgd", "momentum": 0.5}, {"optimizer": "sgd"}])
    with pytest.raises(UsageError, match=r"points\[0\]\.momentum: inactive"):
        load([{"optimizer": "adam", "momentum": 0.5}])
    with pytest.raises(UsageError, match=r"points\[1\]: repeats"):
        load([{"optimizer": "adam"}, {"optimizer": "adam"}])
    with pytest.raises(UsageError, match="--set optimizer"):
        spaces.hold(space, {"optimizer": "sgd"})


def test_levels_identical_seed_for_seed_are_named() -> None:
    from tune_cifar.analysis.comparison import LevelView, identical_levels

    runs = {1: 0.51, 2: 0.52}
    found = [
        LevelView("none", "baseline", {"lr": 0.002}, dict(runs)),
        LevelView("plateau", "baseline", {"lr": 0.002}, dict(reversed(list(runs.items())))),
        LevelView("step", "baseline", {"lr": 0.002}, {1: 0.49, 2: 0.50}),
    ]
    assert identical_levels(found)[0].startswith("Identical runs seed for seed in the baseline view: none = plateau")
    assert found[0].spread == found[1].spread  # the same runs in another order: the same interval
    assert identical_levels(found[1:]) == []


def test_the_larger_budget_says_whether_the_small_budgets_choice_holds() -> None:
    """The choice holds when the small budget's best is best or tied with the best at the larger
    budget (paired verdicts), and not when it falls below; the mean order alone decides nothing."""
    from tune_cifar.analysis.results import choice_line

    def rows(verdicts: dict[str, str]) -> pd.DataFrame:
        return pd.DataFrame({"level": list(verdicts), "view": "tuned", "verdict": list(verdicts.values())})

    small = rows({"adam": "below the best", "sign_sgd": "best", "sgd": "below the best"})
    tied = choice_line(small, rows({"adam": "best", "sign_sgd": "tied with the best", "sgd": "below the best"}))
    assert (
        tied.endswith("the choice holds at this budget.") and "sign_sgd, is tied with the best here (best: adam" in tied
    )
    below = choice_line(small, rows({"adam": "best", "sign_sgd": "below the best", "sgd": "tied with the best"}))
    assert below.endswith("does not hold at this budget.") and "tied with it: sgd" in below
