"""``python -m tune_cifar.train`` end to end, as a user runs it, and its refusals of bad input."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tune_cifar import cli, spaces
from tune_cifar import config as cfg
from tune_cifar.models import build_model
from tune_cifar.plan import StudyPlan
from tune_cifar.study_folder import StudyFolder
from tune_cifar.tables import SCHEMAS
from tune_cifar.train import main

REPO = Path(__file__).resolve().parents[1]


def train(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tune_cifar.train", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_single_run_writes_the_study_tables_and_weights(tmp_path):
    config = write_config(tmp_path / "c.yaml", "model: conditioned_cnn\nfilters: [8, 16, 32]\nbatch_size: 64\n")
    out = tmp_path / "run"
    result = train("--config", str(config), "--epochs", "2", "--subset", "400", "--out", str(out), "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert "epoch   2/2" in result.stdout and "test acc" in result.stdout

    trials = pd.read_parquet(out / "trials")
    epochs = pd.read_parquet(out / "epochs")
    layers = pd.read_parquet(out / "layers")
    assert list(trials.columns) == SCHEMAS["trials"].names and len(trials) == 1
    row = trials.iloc[0]
    assert row["status"] == "TERMINATED" and row["epochs_run"] == 2 and row["filters"] == "8,16,32"
    assert pd.isna(row["momentum"])  # adam: momentum is inactive, so null
    assert row["best_val_acc"] == epochs["val_acc"].max()
    assert 0 <= row["test_acc"] <= 1 and row["train_images"] == 360
    assert list(epochs["epoch"]) == [1, 2]
    assert len(layers) == 2 * len(set(layers["layer"])) and layers["grad_l2"].gt(0).any()

    model = build_model(cfg.from_dict({"model": "conditioned_cnn", "filters": [8, 16, 32]}))
    model.load_state_dict(torch.load(out / "model.pt"))  # the saved weights fit the config


def test_progress_inside_an_epoch_on_a_terminal_only(tmp_path):
    """11.4: on a terminal, a line rewritten in place with images/s and the ETA inside each epoch;
    into a pipe or file, only the one line per epoch. The terminal is a real pseudo-terminal."""
    import os
    import pty
    import re

    config = write_config(tmp_path / "c.yaml", "model: conditioned_cnn\nfilters: [4, 8, 16]\nbatch_size: 16\n")
    args = ["--config", str(config), "--epochs", "1", "--subset", "400", "--threads", "1"]
    master, slave = pty.openpty()
    command = [sys.executable, "-m", "tune_cifar.train", *args, "--out", str(tmp_path / "tty")]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    stdout = process.communicate(timeout=600)[0].decode()
    terminal = b"".join(chunks).decode()
    assert process.returncode == 0, terminal[-2000:]
    assert re.search(r"\repoch +1/1  step \d+/\d+  \d+ img/s  ETA \d+:\d\d", terminal), terminal[-500:]
    assert terminal.endswith("\r\x1b[K") and "epoch   1/1" in stdout  # cleared before the epoch's line

    piped = train(*args, "--out", str(tmp_path / "pipe"))
    assert piped.returncode == 0 and "epoch   1/1" in piped.stdout
    assert "step " not in piped.stderr and "\r" not in piped.stderr + piped.stdout


def test_reads_official_batches_from_data_dir(tmp_path, cifar_dir):
    out = tmp_path / "run"
    result = train(
        "--data", "cifar10", "--data-dir", str(cifar_dir.parent), "--val-size", "10", "--epochs", "1", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert pd.read_parquet(out / "trials").iloc[0]["train_images"] == 90


@pytest.mark.parametrize(
    ("config_text", "args", "message"),
    [
        ("model: resnet\n", (), "unknown model 'resnet'"),
        ("loss: hinge\n", (), "unknown loss 'hinge'"),
        ("optimizer: lbfgs\n", (), "unknown optimizer 'lbfgs'"),
        ("scheduler: cyclic\n", (), "unknown scheduler 'cyclic'"),
        ("activation: gelu\n", (), "unknown activation 'gelu'"),
        ("lr: -0.1\n", (), "lr must be in"),
        ("dropout: 1.5\n", (), "dropout must be in"),
        ("lr: fast\n", (), "lr must be a number"),
        ("colour: blue\n", (), "unknown key 'colour'"),
        ("", ("--epochs", "0"), "epochs must be in"),
        ("", ("--subset", "5"), "subset must be between"),
        ("", ("--device", "cuda:0"), "no CUDA GPU"),
        ("", ("--batch-size", "3"), "unrecognized arguments"),
        ("precision: fp16\n", (), "unknown precision 'fp16'"),
        ("filters: [64.7, 128, 256]\n", (), "filters: expected a list of integers"),
        ("", ("--out", "/proc/run"), "--out /proc/run: cannot write in /proc"),
        ("", ("--precision", "fp16"), "invalid choice: 'fp16'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, config_text, args, message):
    """In-process through the same ``cli.run`` wrapper as ``__main__`` (one subprocess case below)."""
    if args == ("--device", "cuda:0") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = write_config(tmp_path / "c.yaml", config_text)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, ["--config", str(config), "--out", str(out), *args])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists()


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    config = write_config(tmp_path / "c.yaml", "model: resnet\n")
    result = train("--config", str(config), "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: unknown model 'resnet' (choose from small_cnn, conditioned_cnn, vgg_a)"


def test_missing_config_and_corrupt_batches_are_refused(tmp_path, cifar_dir, capsys):
    with pytest.raises(SystemExit) as missing:
        cli.run(main, ["--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "a")])
    assert missing.value.code == 2 and "not found" in capsys.readouterr().err

    (cifar_dir / "data_batch_3").write_bytes(b"\x80\x04 this is not a pickle")
    with pytest.raises(SystemExit) as corrupt:
        cli.run(main, ["--data", "cifar10", "--data-dir", str(cifar_dir.parent), "--out", str(tmp_path / "b")])
    stderr = capsys.readouterr().err
    assert corrupt.value.code == 2 and "data_batch_3" in stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "b").exists()


def test_existing_results_are_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, ["--epochs", "1", "--subset", "100", "--out", str(out)])
    assert exit_info.value.code == 2 and "not empty" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"


def test_seed_best_space_file_is_a_training_config():
    from tune_cifar.spaces import load_config_file

    config = load_config_file(REPO / "search_spaces" / "seed_best.yaml")
    assert (config.activation, config.activation_slope, config.filters) == ("leaky_relu", 0.05, (128, 256, 512))
    assert (config.optimizer, config.lr, config.weight_decay, config.grad_clip) == ("adam", 0.002, 1e-5, 5.0)
    assert (config.loss, config.label_smoothing, config.scheduler, config.min_lr) == (
        "label_smoothing",
        0.15,
        "cosine",
        1e-6,
    )
    assert (config.dropout, config.batchnorm, config.epochs) == (0.4, True, 100)


def test_seeds_repeat_the_run_and_report_mean_and_std(tmp_path):
    config = write_config(tmp_path / "c.yaml", "filters: [8, 16, 32]\nbatch_size: 64\nseed: 4\n")
    out = tmp_path / "run"
    result = train("--config", str(config), "--epochs", "1", "--subset", "300", "--seeds", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    trials = pd.read_parquet(out / "trials").set_index("trial_id").sort_index()
    assert list(trials.index) == ["seed4", "seed5"] and list(trials["seed"]) == [4, 5]
    assert trials["test_acc"].notna().all() and (out / "model_seed4.pt").is_file()
    mean, std = trials["test_acc"].mean(), trials["test_acc"].std(ddof=1)
    assert f"test acc (the test set once per seed): {mean:.2%} ± {100 * std:.2f} (n=2 seeds" in result.stdout


def test_from_study_retrains_the_best_trial_on_the_studys_data(tmp_path):
    study = tmp_path / "study"
    first = train("--config", str(write_config(tmp_path / "a.yaml", "filters: [8, 16, 32]\nlr: 0.003\n")),
                  "--epochs", "1", "--subset", "300", "--out", str(tmp_path / "a"))  # fmt: skip
    assert first.returncode == 0, first.stderr
    rows = pd.read_parquet(tmp_path / "a" / "trials")
    worse = rows.assign(trial_id="worse", lr=0.05, best_val_acc=rows["best_val_acc"] - 0.01)
    (study / "trials").mkdir(parents=True)
    pd.concat([rows, worse]).to_parquet(study / "trials" / "part-all.parquet")
    folder = StudyFolder(study)
    shutil.copyfile(REPO / "search_spaces" / "smoke.yaml", folder.space)
    plan = StudyPlan(name="study", space_file=str(folder.space), num_samples=2, max_epochs=1, data="synthetic",
                     subset=300, val_size=30, seed=0, wandb="disabled")  # fmt: skip
    plan.with_space(spaces.load(folder.space)).save(folder)
    out = tmp_path / "retrain"
    result = train("--from-study", str(study), "--train-on-val", "--epochs", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    row = pd.read_parquet(out / "trials").iloc[0]
    assert row["lr"] == 0.003 and row["filters"] == "8,16,32"  # the best trial, not the other one
    assert row["train_images"] == 300 and row["val_images"] == 0 and 0 <= row["test_acc"] <= 1
    refused = train("--from-study", str(tmp_path / "a" / "nothing"), "--out", str(tmp_path / "x"))
    assert refused.returncode == 2 and "not a study folder" in refused.stderr


def test_set_overrides_a_key_of_a_space_file_config(tmp_path):
    out = tmp_path / "run"
    result = train("--config", "search_spaces/seed_best.yaml", "--set", "filters=4,8,16", "--set", "dropout=0.1",
                   "--epochs", "1", "--subset", "200", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    row = pd.read_parquet(out / "trials").iloc[0]
    assert (row["filters"], row["dropout"], row["loss"]) == ("4,8,16", 0.1, "label_smoothing")
    bad = train("--set", "dropout=2", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "dropout must be in" in bad.stderr and not (tmp_path / "bad").exists()


def test_a_diverging_run_stops_at_that_epoch_and_exits_4(tmp_path):
    """19.4: SGD at lr 9 without batch norm: the loss is not finite within two epochs; the run trains no
    further epoch, is not tested, records DIVERGED and ends with exit 4 and a last line saying so."""
    out = tmp_path / "run"
    done = train("--set", "batchnorm=false", "--set", "optimizer=sgd", "--set", "lr=9", "--set", "filters=8,16,32",
                 "--epochs", "5", "--subset", "300", "--out", str(out))  # fmt: skip
    assert done.returncode == 4, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("diverged: 1 of 1 runs")
    row = pd.read_parquet(out / "trials").iloc[0]
    assert (row["status"], row["stop_reason"]) == ("DIVERGED", "diverged") and row["epochs_run"] < 5
    assert pd.isna(row["test_acc"])  # a diverged model is not tested
    epochs = pd.read_parquet(out / "epochs")
    assert len(epochs) == row["epochs_run"] and not np.isfinite(epochs["train_loss"].iloc[-1])


@pytest.mark.parametrize(("signum", "code", "line"), [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                      (signal.SIGINT, 130, "interrupted")])  # fmt: skip
def test_a_signal_mid_run_exits_in_one_line_and_leaves_whole_tables(tmp_path, signum, code, line):
    """19.1/19.2: SIGTERM (a scheduler) or Ctrl-C in the middle of a run: its exit code, one line, and
    every table readable with no temporary file left (rows are written whole, epoch by epoch)."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "tune_cifar.train", "--set", "filters=8,16,32", "--epochs", "200",
               "--subset", "600", "--out", str(out)]  # fmt: skip
    run = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((out / "epochs").glob("*.parquet")) and time.monotonic() < deadline:
        assert run.poll() is None, run.communicate()
        time.sleep(0.05)
    run.send_signal(signum)
    _, err = run.communicate(timeout=60)
    assert run.returncode == code and err.strip().splitlines() == [line], err
    epochs = pd.read_parquet(out / "epochs")
    assert 1 <= len(epochs) < 200 and not list(out.rglob(".*.tmp"))
