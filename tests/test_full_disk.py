"""19.3: a full disk, on a real small filesystem (a tmpfs mounted for the test; skipped, saying why,
where mounting is refused). One line naming the folder and the error, a clean stop with its exit
code and the resume line, and after the space is freed ``--resume`` finishes every trial once."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import optuna
import pandas as pd
import pytest
from test_study import REPRODUCIBLE_SPACE, search_cmd, study_env

from tune_cifar.study_folder import StudyFolder

REPO = Path(__file__).resolve().parents[1]


def _mount(folder: Path, size: str) -> None:
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                          text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or done.returncode}): needs root")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "small"
    folder.mkdir()
    _mount(folder, "1m")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_train_on_a_full_disk_exits_3_in_one_line_and_leaves_only_whole_files(small_disk: Path) -> None:
    out = small_disk / "run"
    command = [sys.executable, "-m", "tune_cifar.train", "--set", "filters=16,32,64", "--epochs", "2",
               "--subset", "300", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        f"error: cannot write the run's results in {out}: No space left on device; what was written is whole"
    ]
    assert not list(out.rglob(".*.tmp")) and not list(out.rglob("*.tmp"))
    for table in ("trials", "epochs"):  # whatever was written reads back whole
        if (out / table).is_dir() and list((out / table).glob("part-*")):
            pd.read_parquet(out / table)


def test_a_study_on_a_full_disk_stops_cleanly_and_resumes_once_there_is_space(small_disk: Path, ray_tmp: Path) -> None:
    space = small_disk.parent / "full.yaml"
    space.write_text(REPRODUCIBLE_SPACE.replace("num_samples: 12", "num_samples: 6"))
    args = ("--space", str(space), "--name", "f", "--storage-path", str(small_disk), "--wandb", "disabled")
    done = subprocess.run(search_cmd(*args), cwd=REPO, env=study_env(ray_tmp), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 3, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write the study in {small_disk / 'f'}: No space left on device (ENOSPC)")
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1].endswith(f"--resume --name f --storage-path {small_disk}")

    subprocess.run(["mount", "-o", "remount,size=300m", str(small_disk)], check=True)  # the space is freed
    resumed = subprocess.run(search_cmd("--resume", "--name", "f", "--storage-path", str(small_disk)), cwd=REPO,
                             env=study_env(ray_tmp), capture_output=True, text=True, timeout=400)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    folder = small_disk / "f"
    trials, epochs = pd.read_parquet(folder / "trials"), pd.read_parquet(folder / "epochs")
    assert len(trials) == 6 and trials["trial_id"].is_unique and set(trials["status"]) <= {"TERMINATED", "STOPPED"}
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    stored = optuna.load_study(study_name="f", storage=StudyFolder(folder).optuna_url).get_trials()
    assert all(trial.state.is_finished() for trial in stored)  # none left RUNNING
    # Each trial of the study is one Optuna trial. Optuna may also hold trials of work the full disk
    # kept Ray from recording (asked, then lost with the experiment state it could not save):
    # those are closed, never counted as this study's trials.
    ray_ids = [trial.user_attrs.get("ray_trial_id") for trial in stored]
    assert all(ray_ids.count(trial_id) == 1 for trial_id in trials["trial_id"]), ray_ids
