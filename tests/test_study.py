"""End-to-end studies on real Ray, Optuna, W&B (offline) and Parquet, kept small for 2 CPU cores.

One smoke study (8 tiny trials, 3 epochs, ASHA deciding after epoch 1) is run once for the
module, with one trial worker killed mid-epoch, and several tests read what it left. A
second study is killed by pid and resumed. Every Ray cluster here is the driver's own,
bound to 127.0.0.1, with a private temp dir and a fresh auth token, so no test attaches to
a cluster left over by someone else and nothing is written to ``/tmp/ray`` or ``~/.ray``.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tune_cifar import config as cfg
from tune_cifar import optuna_db
from tune_cifar.study_folder import StudyContext, StudyFolder

REPO = Path(__file__).resolve().parents[1]
FAULT_INJECTION = REPO / "tests" / "fault_injection"
SMOKE_TRIALS = 8
SMOKE_EPOCHS = 3
CRASH_EPOCH = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def study_env(ray_tmp: Path, **extra: str) -> dict[str, str]:
    """A study's environment; with ``TUNE_CIFAR_CRASH_ONCE`` in ``extra``, the test-only fault
    injection (``tests/fault_injection``) is on the path of every process the study starts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_", "TUNE_"))}
    faults = [str(FAULT_INJECTION)] if "TUNE_CIFAR_CRASH_ONCE" in extra else []
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),  # never read or write ~/.ray/auth_token
        RAY_TMPDIR=str(ray_tmp),  # sessions and ray_current_cluster under a private folder
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # node IP 127.0.0.1
        RAY_USAGE_STATS_ENABLED="0",
        WANDB_SILENT="true",
        PYTHONPATH=os.pathsep.join(filter(None, [*faults, str(REPO), os.environ.get("PYTHONPATH")])),
        **extra,
    )
    return env


def search_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tune_cifar.search", *args]


@dataclass
class Study:
    folder: Path
    name: str
    stdout: str
    marker: Path

    def table(self, name: str) -> pd.DataFrame:
        return pd.read_parquet(self.folder / name)

    def optuna(self) -> optuna.Study:
        return optuna.load_study(study_name=self.name, storage=f"sqlite:///{self.folder / 'optuna.db'}")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory, ray_tmp: Path) -> Study:
    root = tmp_path_factory.mktemp("studies")
    marker = root / "crashed-once"
    home = root / "home"  # a private HOME: nothing of the study may land in it (W&B caches)
    home.mkdir()
    env = study_env(ray_tmp, TUNE_CIFAR_CRASH_ONCE=f"{marker}:{CRASH_EPOCH}:0.1", HOME=str(home))
    cmd = search_cmd("--space", "smoke", "--name", "smoke", "--storage-path", str(root), "--wandb", "offline")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return Study(root / "smoke", "smoke", done.stdout, marker)


def test_smoke_study_completes(smoke: Study) -> None:
    trials = smoke.table("trials")
    assert len(trials) == SMOKE_TRIALS and trials["trial_id"].is_unique
    assert set(trials["status"]) <= {"TERMINATED", "STOPPED"}
    assert (trials["study"] == "smoke").all()
    assert trials["macs"].gt(0).all() and trials["params"].gt(0).all() and trials["node"].notna().all()
    assert (trials.loc[trials.status == "TERMINATED", "epochs_run"] == SMOKE_EPOCHS).all()
    analyse = rf"^analyse: \S*python\S* -m tune_cifar\.analysis\.best_config {re.escape(str(smoke.folder))}$"
    assert re.search(analyse, smoke.stdout, re.MULTILINE), smoke.stdout[-1000:]
    assert json.loads((smoke.folder / "study.json").read_text())["num_samples"] == SMOKE_TRIALS
    # the space's val_size (128 of the 640-image subset) is used as written, and said at the start
    assert "512 train / 128 validation / 128 test images" in smoke.stdout
    assert (trials["val_images"] == 128).all() and (trials["train_images"] == 512).all()


def test_the_printed_analysis_command_works_in_a_fresh_shell(smoke: Study, tmp_path: Path) -> None:
    """11.1: the study's closing ``analyse:`` line, run as printed by a shell with no environment
    activated and no PYTHONPATH (the README's set-up leaves .venv unactivated)."""
    command = next(line for line in smoke.stdout.splitlines() if line.startswith("analyse: ")).removeprefix("analyse: ")
    report = smoke.folder / "analysis" / "report.md"
    report.unlink(missing_ok=True)
    fresh = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    done = subprocess.run(command, shell=True, cwd=REPO, env=fresh, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, command + "\n" + done.stderr[-3000:]
    assert report.is_file() and "Leaderboard" in report.read_text()


def test_asha_stopped_trials_are_pruned_in_optuna(smoke: Study) -> None:
    trials = smoke.table("trials").set_index("trial_id")
    stopped = trials[trials.status == "STOPPED"]
    assert len(stopped) >= 1, "ASHA stopped no trial"
    assert (stopped["epochs_run"] < SMOKE_EPOCHS).all() and (stopped["stop_reason"] == "asha").all()

    study = smoke.optuna()
    by_ray_id = {t.user_attrs["ray_trial_id"]: t for t in study.get_trials()}
    assert set(by_ray_id) == set(trials.index) and len(study.trials) == SMOKE_TRIALS
    epochs = smoke.table("epochs")
    for trial_id, row in trials.iterrows():
        frozen = by_ray_id[trial_id]
        expected = optuna.trial.TrialState.PRUNED if row.status == "STOPPED" else optuna.trial.TrialState.COMPLETE
        assert frozen.state == expected, (trial_id, frozen.state)
        # every epoch is an intermediate value, the stopping epoch included
        mine = epochs[epochs.trial_id == trial_id].set_index("epoch")["val_acc"].to_dict()
        assert frozen.intermediate_values == pytest.approx(mine)
        assert sorted(frozen.intermediate_values) == list(range(1, int(row.epochs_run) + 1))
        assert frozen.value == pytest.approx(frozen.intermediate_values[int(row.epochs_run)])


def test_inactive_hyperparameters_are_null(smoke: Study) -> None:
    trials = smoke.table("trials")
    params = {t.user_attrs["ray_trial_id"]: t.params for t in smoke.optuna().get_trials()}
    for row in trials.to_dict("records"):
        null = {key for key in cfg.KEYS if pd.isna(row[key])}
        active = cfg.active_keys({key: row[key] for key in cfg.KEYS if key not in null})
        assert null == set(cfg.KEYS) - active, row["trial_id"]
        assert ("momentum" in null) == (row["optimizer"] not in ("sgd", "sign_sgd"))
        assert ("focal_gamma" in null) == (row["loss"] != "focal")
        assert ("label_smoothing" in null) == (row["loss"] != "label_smoothing")
        assert ("step_size" in null) == ("gamma" in null) == (row["scheduler"] != "step")
        assert ("activation_slope" in null) == (row["activation"] != "leaky_relu")
        # Optuna sampled exactly the active keys of the space
        sampled = set(params[row["trial_id"]])
        space_keys = {"optimizer", "lr", "momentum", "scheduler", "step_size", "gamma", "loss", "focal_gamma"}
        space_keys |= {"label_smoothing", "activation", "activation_slope", "filters", "dropout"}
        assert sampled == space_keys & active


def test_tables_match_rays_results(smoke: Study) -> None:
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(smoke.folder))
    ray_ids = {trial.trial_id for trial in analysis.trials}
    trials = smoke.table("trials").set_index("trial_id")
    epochs, layers = smoke.table("epochs"), smoke.table("layers")
    assert ray_ids == set(trials.index) == set(epochs.trial_id) == set(layers.trial_id)
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    assert not layers.duplicated(["trial_id", "epoch", "layer"]).any()
    for trial_id, frame in analysis.trial_dataframes.items():
        ray_rows = frame.drop_duplicates("epoch", keep="last").set_index("epoch")
        mine = epochs[epochs.trial_id == trial_id].set_index("epoch").sort_index()
        assert list(mine.index) == list(range(1, len(mine) + 1))
        assert list(mine.index) == sorted(ray_rows.index)
        assert mine["val_acc"].tolist() == pytest.approx(ray_rows.loc[mine.index, "val_acc"].tolist())
        assert mine["train_loss"].tolist() == pytest.approx(ray_rows.loc[mine.index, "train_loss"].tolist())
        row = trials.loc[trial_id]
        assert row.epochs_run == len(mine) and row.best_val_acc == pytest.approx(mine["val_acc"].max())
        per_epoch = layers[layers.trial_id == trial_id].groupby("epoch").size()
        assert list(per_epoch.index) == list(mine.index) and per_epoch.nunique() == 1


def test_killed_worker_is_retried_from_its_checkpoint(smoke: Study) -> None:
    from ray.tune import ExperimentAnalysis

    assert smoke.marker.exists(), "no trial worker was killed"
    failed = [t for t in ExperimentAnalysis(str(smoke.folder)).trials if t.run_metadata.num_failures > 0]
    assert len(failed) == 1 and failed[0].run_metadata.num_failures == 1
    trial_id = failed[0].trial_id
    row = smoke.table("trials").set_index("trial_id").loc[trial_id]
    assert row.status in ("TERMINATED", "STOPPED") and row.epochs_run >= CRASH_EPOCH
    epochs = smoke.table("epochs")
    assert epochs[epochs.trial_id == trial_id]["epoch"].tolist() == list(range(1, int(row.epochs_run) + 1))
    frozen = {t.user_attrs["ray_trial_id"]: t for t in smoke.optuna().get_trials()}[trial_id]
    assert sorted(frozen.intermediate_values) == list(range(1, int(row.epochs_run) + 1))


def test_checkpoint_every_bounds_what_a_killed_worker_redoes(tmp_path: Path, ray_tmp: Path) -> None:
    """10.2: with ``--checkpoint-every 2`` a worker killed in epoch 4 (last checkpoint: epoch 2) is
    retried from epoch 2, redoing epoch 3 only (at most every - 1 finished epochs), and the tables
    hold every epoch once, with the values the retry reported."""
    space = tmp_path / "one.yaml"
    space.write_text(
        "num_samples: 1\nmax_epochs: 5\nasha: null\ndata: {source: synthetic, subset: 200, val_size: 40}\n"
        'fixed: {model: conditioned_cnn, filters: "4,8,16", batch_size: 32, augment: false}\n'
    )
    marker = tmp_path / "crashed"
    env = study_env(ray_tmp, TUNE_CIFAR_CRASH_ONCE=f"{marker}:4:0")  # at once
    args = ("--space", str(space), "--name", "k", "--storage-path", str(tmp_path), "--wandb", "disabled")
    done = subprocess.run(search_cmd(*args, "--checkpoint-every", "2"), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert marker.exists(), "the worker was never killed"
    # Ray's progress.csv keeps every report of both attempts (its result.json is rewound on a restore)
    (progress,) = (tmp_path / "k").glob("trial_*/progress.csv")
    reported = pd.read_csv(progress)
    assert reported["epoch"].tolist() == [1, 2, 3, 3, 4, 5]  # the retry started after epoch 2
    epochs = pd.read_parquet(tmp_path / "k" / "epochs")
    assert epochs["epoch"].tolist() == [1, 2, 3, 4, 5]
    retried = reported.iloc[3:].set_index("epoch")["train_loss"]
    assert epochs.set_index("epoch")["train_loss"].loc[[3, 4, 5]].tolist() == retried.loc[[3, 4, 5]].tolist()
    trial = pd.read_parquet(tmp_path / "k" / "trials").iloc[0]
    assert trial["status"] == "TERMINATED" and trial["epochs_run"] == 5


def wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of an offline run file (``run-*.wandb``), read independently of W&B's writer.

    The file is W&B's LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB
    blocks of chunks, each ``crc32 (4) | length (2, LE) | type (1: full, 2: first, 3: middle,
    4: last)`` followed by its bytes; a block's tail shorter than a chunk header is padding.
    """
    from wandb.proto import wandb_internal_pb2

    raw, block = path.read_bytes(), 32768
    assert raw[:4] == b":W&B", path
    position, pieces = 7, []
    while position + 7 <= len(raw):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[position : position + 7])
        if kind == 0 and length == 0:  # zero padding to the block's end
            position += left
            continue
        pieces.append(raw[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            pieces = []
            yield record


@dataclass
class OfflineRun:
    tags: list[str]
    summary: dict[str, Any]  # top-level keys, as the summary shows them at the end
    exit_code: int | None


def read_offline_run(run_dir: Path) -> OfflineRun:
    tags: list[str] = []
    summary: dict[str, Any] = {}
    exit_code = None
    for record in wandb_records(next(run_dir.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            tags = list(record.run.tags)  # the latest run record holds the tags set last
        elif kind == "summary":
            for item in record.summary.update:
                key = item.key or "/".join(item.nested_key)
                summary[key] = json.loads(item.value_json)
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return OfflineRun(tags, summary, exit_code)


def test_wandb_offline_runs_with_flow_charts(smoke: Study) -> None:
    from tune_cifar.outcome import WANDB_TAGS, Outcome
    from tune_cifar.report import HEALTH_ORDER

    trials = smoke.table("trials").set_index("trial_id")
    layers = smoke.table("layers")
    runs = sorted((smoke.folder / "wandb").glob("offline-run-*"))
    assert {run.name.rsplit("-", 1)[-1] for run in runs} == set(trials.index)
    for run in runs:
        assert list(run.glob("run-*.wandb"))
        tables = {path.name.split("_table")[0] for path in (run / "files" / "media" / "table").glob("*.table.json")}
        assert {"grad_flow", "update_flow"} <= tables, run

        # the run ends in the trials table's words: summary status, and a tag W&B's UI can filter on
        trial_id = run.name.rsplit("-", 1)[-1]
        row = trials.loc[trial_id]
        offline = read_offline_run(run)
        assert offline.summary["status"] == row.status and offline.summary["stop_reason"] == row.stop_reason
        ended = Outcome.of_row(row.status, row.stop_reason)
        assert [tag for tag in offline.tags if tag in WANDB_TAGS] == [ended.wandb_tag], run
        assert offline.exit_code == 0  # no trial errored: W&B's own state is "finished"

        # flow charts list the layers in forward order (layers.layer_index), not by name
        mine = layers[layers.trial_id == trial_id]
        forward = list(mine.sort_values("layer_index")["layer"].drop_duplicates())
        assert forward != sorted(forward)  # the check could fail: the names alone sort differently
        for chart in ("grad_flow", "update_flow"):
            table = json.loads(next((run / "files" / "media" / "table").glob(f"{chart}_table*.json")).read_text())
            keys = table["columns"].index("lineKey")
            assert list(dict.fromkeys(line[keys] for line in table["data"])) == forward, chart

        # per-layer health, the layers table's judgement, last epoch (0 ok, 1 vanishing, 2 exploding)
        last = mine[mine.epoch == mine.epoch.max()]
        assert {f"health/{r.layer}": HEALTH_ORDER.index(r.health) for r in last.itertuples()} == {
            key: value for key, value in offline.summary.items() if key.startswith("health/")
        }
    stopped = trials[trials.status == "STOPPED"].index
    assert len(stopped) >= 1 and all(
        "asha-stopped" in read_offline_run(run).tags for run in runs if run.name.rsplit("-", 1)[-1] in stopped
    )


def test_a_damaged_part_file_is_named_then_rebuilt_on_resume(smoke: Study, tmp_path: Path, ray_tmp: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(smoke.folder, root / "smoke", ignore=shutil.ignore_patterns(".driver.lock"))
    folder = root / "smoke"
    trials = smoke.table("trials")
    victim, short = trials[trials["status"] == "TERMINATED"]["trial_id"].iloc[:2]
    for name in ("trials", "epochs"):
        part = folder / name / f"part-{victim}.parquet"
        part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # truncated, as by a full disk
    # another finished trial's last round never reached the disk (a driver killed in the writer's
    # pacing): whole files, its last epoch missing from every table and its row still RUNNING
    last = int(smoke.table("epochs").query("trial_id == @short")["epoch"].max())
    assert last >= 2
    for name in ("epochs", "layers"):
        part = folder / name / f"part-{short}.parquet"
        table = pq.read_table(part)
        pq.write_table(table.filter(pc.less(table["epoch"], last)), part)
    part = folder / "trials" / f"part-{short}.parquet"
    table = pq.read_table(part)
    running = pa.array(["RUNNING"] * len(table), table.schema.field("status").type)
    pq.write_table(table.set_column(table.schema.get_field_index("status"), "status", running), part)
    analysis = subprocess.run([sys.executable, "analysis/best_config.py", str(folder)], cwd=REPO, capture_output=True,
                              text=True)  # fmt: skip
    assert analysis.returncode == 2 and analysis.stderr.count("\n") == 1
    assert f"part-{victim}.parquet: damaged Parquet file" in analysis.stderr

    done = subprocess.run(search_cmd("--resume", "--name", "smoke", "--storage-path", str(root)), cwd=REPO,
                          env=study_env(ray_tmp), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "damaged; set aside" in done.stdout and "rebuilt from Ray's results" in done.stdout
    assert "rows behind Ray's saved state (a driver stopped before its last writes): 1 trials rebuilt" in done.stdout
    for name in ("trials", "epochs", "layers"):
        rebuilt = pd.read_parquet(folder / name).sort_values(list(pd.read_parquet(folder / name).columns[:2]))
        original = smoke.table(name).sort_values(list(rebuilt.columns[:2]))
        pd.testing.assert_frame_equal(rebuilt.reset_index(drop=True), original.reset_index(drop=True))
    assert (folder / "damaged" / "trials" / f"part-{victim}.parquet").is_file()


def test_a_finished_study_leaves_nothing_outside_its_folder_and_one_checkpoint(smoke: Study) -> None:
    home = smoke.folder.parent / "home"
    assert not [p for p in home.rglob("*") if "wandb" in p.name], "W&B wrote outside the study folder"
    trial_ids = set(smoke.table("trials")["trial_id"])
    leftovers = [p for p in Path(tempfile.gettempdir()).glob("tune-cifar-ckpt-*") if p.name.split("-")[3] in trial_ids]
    assert not leftovers
    with_checkpoints = {p.parent.name for p in smoke.folder.glob("trial_*/checkpoint_*")}
    ranked = smoke.table("trials").sort_values(
        ["best_val_acc", "epochs_run", "trial_id"], ascending=[False, True, True]
    )
    best = ranked["trial_id"].iloc[0]
    assert with_checkpoints == {f"trial_{best}"}  # the best trial's weights, nothing else


def test_existing_study_is_not_overwritten(smoke: Study, ray_tmp: Path) -> None:
    before = {path: path.stat().st_mtime_ns for path in smoke.folder.rglob("*.parquet")}
    cmd = search_cmd("--space", "smoke", "--name", "smoke", "--storage-path", str(smoke.folder.parent))
    done = subprocess.run(cmd, cwd=REPO, env=study_env(ray_tmp), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "exists already" in done.stderr and "--resume" in done.stderr
    assert before == {path: path.stat().st_mtime_ns for path in smoke.folder.rglob("*.parquet")}


def _kill_a_smoke_study(root: Path, env: dict[str, str], args: tuple[str, ...]) -> Path:
    """Start the smoke study, SIGKILL its driver once two trials finished; its folder."""
    driver = subprocess.Popen(
        search_cmd("--space", "smoke", *args), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    folder = root / "resumed"
    deadline = time.monotonic() + 300
    finished = 0
    while time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.3)
        try:
            finished = int(pd.read_parquet(folder / "trials")["status"].isin(["TERMINATED", "STOPPED"]).sum())
        except Exception:  # not written yet (no part file, or only a temporary one)
            continue
        if finished >= 2:
            break
    assert driver.poll() is None, f"the study ended before it could be interrupted: {driver.stderr.read()[-2000:]}"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    assert 2 <= finished < SMOKE_TRIALS
    killed = pd.read_parquet(folder / "epochs")  # what a killed driver leaves reads whole, each row once
    assert not killed.duplicated(["trial_id", "epoch"]).any() and len(killed) > 0
    return folder


def test_a_killed_study_resumes_with_each_trial_once_and_a_damaged_round_rebuilt(tmp_path: Path, ray_tmp: Path) -> None:
    root = tmp_path / "studies"
    env = study_env(ray_tmp)
    args = ("--name", "resumed", "--storage-path", str(root), "--wandb", "disabled")
    folder = _kill_a_smoke_study(root, env, args)
    # and then a round file is damaged: it held rows of trials it cannot name, so every trial is rebuilt
    latest = sorted((folder / "epochs").glob("round-*.parquet"))[-1]
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])

    done = subprocess.run(search_cmd("--resume", *args), cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert f"{latest}: damaged; set aside" in done.stdout and "trials rebuilt from Ray's results" in done.stdout
    _assert_resumed_whole(folder)


def test_a_killed_study_whose_last_round_never_reached_the_disk_resumes_whole(tmp_path: Path, ray_tmp: Path) -> None:
    """The writer's last round lost with the driver (killed inside its pacing): rows of an epoch
    Ray's saved state holds, which Ray will not replay. Here every round file holding the last
    saved epoch of some trial is deleted (whole files, as if never renamed into place); the
    resume rebuilds the trials that fell behind from Ray's results."""
    from ray.tune import ExperimentAnalysis

    root = tmp_path / "studies"
    env = study_env(ray_tmp)
    args = ("--name", "resumed", "--storage-path", str(root), "--wandb", "disabled")
    folder = _kill_a_smoke_study(root, env, args)
    saved = {t.trial_id: int(t.last_result.get("epoch") or 0) for t in ExperimentAnalysis(str(folder)).trials}
    deleted = 0
    for name in ("epochs", "layers"):
        for part in (folder / name).glob("round-*.parquet"):
            rows = pd.read_parquet(part, columns=["trial_id", "epoch"])
            if any(saved.get(t) == e for t, e in rows.itertuples(index=False)):
                part.unlink()
                deleted += 1
    assert deleted >= 1, "no round file held an epoch of Ray's saved state"

    done = subprocess.run(search_cmd("--resume", *args), cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "rows behind Ray's saved state" in done.stdout
    _assert_resumed_whole(folder)


def _assert_resumed_whole(folder: Path) -> None:
    """A resumed smoke study: every trial once, every epoch once, tables merged, Optuna closed."""
    from ray.tune import ExperimentAnalysis

    ray_trials = ExperimentAnalysis(str(folder)).trials
    trials = pd.read_parquet(folder / "trials")
    epochs = pd.read_parquet(folder / "epochs")
    study = optuna.load_study(study_name="resumed", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert len(ray_trials) == SMOKE_TRIALS and all(t.status == "TERMINATED" for t in ray_trials)
    assert len(trials) == SMOKE_TRIALS and trials["trial_id"].is_unique
    assert set(trials["trial_id"]) == {t.trial_id for t in ray_trials} == set(epochs["trial_id"])
    assert set(trials["status"]) <= {"TERMINATED", "STOPPED"}
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    last_epoch = {t.trial_id: int(t.last_result["epoch"]) for t in ray_trials}
    epochs_run = dict(zip(trials["trial_id"], trials["epochs_run"], strict=True))
    layer_epochs = pd.read_parquet(folder / "layers", columns=["trial_id", "epoch"]).drop_duplicates()
    for trial_id, group in epochs.groupby("trial_id"):
        every = list(range(1, last_epoch[trial_id] + 1))  # none missing, the last one included
        assert sorted(group["epoch"]) == every and epochs_run[trial_id] == len(every), trial_id
        assert sorted(layer_epochs[layer_epochs.trial_id == trial_id]["epoch"]) == every, trial_id
    for name in (
        "trials",
        "epochs",
        "layers",
    ):  # the resumed driver merged every trial's epochs, its own and the killed one's
        assert sorted(p.name for p in (folder / name).glob("*.parquet")) == sorted(
            f"part-{t}.parquet" for t in trials["trial_id"]
        )
    # Optuna: one finished trial per Ray trial, none left RUNNING by the killed driver
    states = [t.state for t in study.trials]
    assert len(study.trials) == SMOKE_TRIALS and all(state.is_finished() for state in states)
    assert {t.user_attrs["ray_trial_id"] for t in study.trials} == set(trials["trial_id"])
    pruned = sum(state == optuna.trial.TrialState.PRUNED for state in states)
    assert pruned == (trials["status"] == "STOPPED").sum()


def test_tables_read_while_the_study_writes_them_are_whole_and_each_row_once(tmp_path: Path, ray_tmp: Path) -> None:
    """23.2: pandas, pyarrow and DuckDB read the tables while the driver's writer thread writes them,
    in round files and a live trials file: never an error, never a row twice, and rows appear as the study goes.
    At the end every trial's epochs are merged into one file per table."""
    import duckdb

    space = tmp_path / "live.yaml"
    trials_n = 4
    space.write_text(REPRODUCIBLE_SPACE.replace("num_samples: 12", f"num_samples: {trials_n}")
                     .replace("max_epochs: 2", "max_epochs: 4").replace("asha: {grace_period: 1, reduction_factor: 2}",
                                                                         "asha: null"))  # fmt: skip
    args = ("--space", str(space), "--name", "live", "--storage-path", str(tmp_path / "s"), "--wandb", "disabled")
    driver = subprocess.Popen(search_cmd(*args, "--max-concurrent", "2"), cwd=REPO, env=study_env(ray_tmp),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    folder = tmp_path / "s" / "live"
    _wait_for(folder / "epochs", driver)
    sizes = []
    while driver.poll() is None:
        time.sleep(0.05)
        if not list((folder / "epochs").glob("*.parquet")):
            continue  # the first file is still under its temporary name
        try:
            frames = {
                "pandas": pd.read_parquet(folder / "epochs", columns=["trial_id", "epoch"]),
                "pyarrow": pq.read_table(folder / "epochs", columns=["trial_id", "epoch"]).to_pandas(),
                "duckdb": duckdb.sql(f"SELECT trial_id, epoch FROM read_parquet('{folder}/epochs/*.parquet')").df(),
            }
            for reader, frame in frames.items():
                assert not frame.duplicated().any(), (reader, frame)
        except (FileNotFoundError, duckdb.IOException, AssertionError):
            # the merge at the study's end (README: a reader may then find a file gone or a row twice)
            # starts only once every trial's final row is on disk; before that, any of these fails
            finished = pd.read_parquet(folder / "trials", columns=["status"])["status"].eq("TERMINATED").sum()
            if finished == trials_n:
                break
            raise
        sizes.append(len(frames["pandas"]))
        finished = pd.read_parquet(folder / "trials", columns=["status"])["status"].eq("TERMINATED").sum()
        if finished >= trials_n - 1:
            break  # the last trial's end merges the files: a reader then may have to read again (README)
    assert driver.wait(timeout=300) == 0, driver.stderr.read()[-3000:]
    assert len(set(sizes)) >= 3, f"the reader never saw the table grow: {sizes}"
    epochs = pd.read_parquet(folder / "epochs")
    assert len(epochs) == trials_n * 4 and not epochs.duplicated(["trial_id", "epoch"]).any()
    for name in ("trials", "epochs", "layers"):
        assert sorted(p.name for p in (folder / name).glob("*")) == sorted(
            f"part-{t}.parquet" for t in epochs.trial_id.unique()
        )


@pytest.fixture(scope="module")
def seeds_study(tmp_path_factory: pytest.TempPathFactory, ray_tmp: Path) -> Path:
    """The optimizer grid with --seeds 2 on 200 synthetic images, 1 epoch, narrow: 8 trials."""
    root = tmp_path_factory.mktemp("results")
    args = ("--space", "grid_optimizers", "--data", "synthetic", "--subset", "200", "--max-epochs", "1")
    args += ("--seeds", "2", "--seed", "7", "--set", "filters=4,8,16", "--max-concurrent", "2")
    args += ("--name", "grid_optimizers", "--storage-path", str(root), "--wandb", "disabled")
    done = subprocess.run(search_cmd(*args), cwd=REPO, env=study_env(ray_tmp), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return root / "grid_optimizers"


def test_seeds_repeat_each_grid_point_and_tables_average_them(seeds_study: Path, ray_tmp: Path) -> None:
    """--seeds 2 on the 4-level optimizer grid: 8 trials, and each level's mean ± std rests on its 2 seeds."""
    from tune_cifar.analysis import _study, best_config

    trials = pd.read_parquet(seeds_study / "trials")
    assert sorted(zip(trials["optimizer"], trials["seed"], strict=True)) == [
        (o, s) for o in ("adam", "adamw", "sgd", "sign_sgd") for s in (7, 8)
    ]
    assert set(trials["filters"]) == {"4,8,16"}  # held by --set over the space's 128,256,512
    study = _study.load_study(seeds_study)
    assert "seed" not in _study.factors(study.finished)  # repeats are averaged, not a factor
    table = best_config.factor_table(study, "optimizer").set_index("optimizer")
    for optimizer, group in trials.groupby("optimizer"):
        assert table.loc[optimizer, "trials"] == 2
        assert table.loc[optimizer, "mean_val_acc"] == pytest.approx(group["final_val_acc"].mean())
        assert table.loc[optimizer, "std_val_acc"] == pytest.approx(group["final_val_acc"].std(ddof=1))
    refused = subprocess.run(
        search_cmd("--space", "grid_losses", "--seeds", "2", "--num-samples", "3", "--storage-path",
                   str(seeds_study.parent)),
        cwd=REPO, env=study_env(ray_tmp), capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode == 2 and "a grid runs each of its 8 combinations once" in refused.stderr


def test_results_md_states_budgets_and_mean_std(seeds_study: Path, tmp_path: Path) -> None:
    """analysis/results.py on a results folder with one factor grid and two 2-seed retrains (synthetic)."""
    from test_analysis import make_fake_bn_study

    studies = seeds_study.parent
    for name in ("retrain_tuned", "retrain_hand"):
        if not (studies / name).exists():
            train = [sys.executable, "-m", "tune_cifar.train", "--set", "filters=4,8,16", "--subset", "200",
                     "--epochs", "1", "--seeds", "2", "--train-on-val", "--full-test"]  # fmt: skip
            train += ["--out", str(studies / name)]
            done = subprocess.run(train, cwd=REPO, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
    if not (studies / "bn_adam").exists():
        shutil.move(make_fake_bn_study(tmp_path), studies / "bn_adam")
    out = tmp_path / "RESULTS.md"
    done = subprocess.run(
        [sys.executable, "analysis/results.py", str(studies), "--out", str(out), "--figures", str(tmp_path / "fig")],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    # no comparison ran here (tests/test_compare.py covers section 1): each factor says how to run it
    assert "### scheduler\n\nNot run yet (`make results DATA_DIR=... CHUNK=2`)" in text
    assert "91.53%" in text and "For context, not comparison" in text
    tuned = pd.read_parquet(studies / "retrain_tuned" / "trials")["test_acc"]
    assert f"{100 * tuned.mean():.2f} ± {100 * tuned.std(ddof=1):.2f}" in text
    assert "BN trains faster" in text and (tmp_path / "fig" / "bn_adam_band.png").is_file()


REPRODUCIBLE_SPACE = """
description: twelve trials, past TPE's ten random start-up trials, ASHA deciding after epoch 1
num_samples: 12
max_epochs: 2
data: {source: synthetic, subset: 200, val_size: 40}
asha: {grace_period: 1, reduction_factor: 2}
fixed: {model: conditioned_cnn, filters: "4,8,16", batch_size: 32, augment: false}
params:
  optimizer: {choice: [adam, sgd]}
  lr: {loguniform: [1.0e-3, 1.0e-1]}
  momentum: {uniform: [0.8, 0.99]}
  dropout: {uniform: [0.0, 0.5]}
"""


def test_a_seed_with_one_trial_at_a_time_reproduces_the_study(tmp_path: Path, ray_tmp: Path) -> None:
    """Same --seed and --max-concurrent 1: the same configurations, ASHA decisions and curves (README, --seed)."""
    space = tmp_path / "repro.yaml"
    space.write_text(REPRODUCIBLE_SPACE)
    runs = []
    for name in ("first", "second"):
        args = ("--space", str(space), "--name", name, "--storage-path", str(tmp_path), "--seed", "3")
        args += ("--max-concurrent", "1", "--wandb", "disabled")
        done = subprocess.run(search_cmd(*args), cwd=REPO, env=study_env(ray_tmp), capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / name / 'optuna.db'}")
        runs.append([(t.number, t.params, t.state, t.intermediate_values) for t in study.trials])
    first, second = runs
    assert len(first) == 12 and any(state == optuna.trial.TrialState.PRUNED for _, _, state, _ in first)
    assert first == second


def test_more_gpus_than_the_cluster_has_is_refused(tmp_path: Path, ray_tmp: Path) -> None:
    cmd = search_cmd(
        "--space", "smoke", "--storage-path", str(tmp_path), "--gpus-per-trial", "1", "--wandb", "disabled"
    )
    done = subprocess.run(cmd, cwd=REPO, env=study_env(ray_tmp), capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith("error: --gpus-per-trial 1 --cpus-per-trial 1: no node can ever hold one trial")
    assert done.stderr.count("\n") == 1
    assert not any(tmp_path.iterdir())  # nothing written for a study that cannot run


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--space", "no_such_space"), "unknown space 'no_such_space'"),
        (("--space", "smoke", "--bogus-flag"), "unrecognized arguments: --bogus-flag"),
        (("--space", "smoke", "--num-samples", "0"), "--num-samples must be at least 1"),
        (("--resume",), "--resume needs --name"),
        (("--resume", "--name", "never-ran"), "no study"),
        (("--space", "smoke", "--data", "imagenet"), "invalid choice: 'imagenet'"),
        (("--space", "smoke", "--seeds", "2"), "only a grid or a fixed configuration can be repeated"),
        (("--space", "grid_losses", "--seeds", "0"), "--seeds must be at least 1"),
        (("--space", "smoke", "--set", "filters"), "expected KEY=VALUE"),
        (("--space", "smoke", "--set", "colour=blue"), "--set colour: not a key"),
        (("--space", "smoke", "--set", "optimizer=lbfgs"), "unknown optimizer 'lbfgs'"),
        (("--space", "smoke", "--precision", "fp16"), "invalid choice: 'fp16'"),
        (("--space", "smoke", "--grace-period", "0"), "--grace-period must be at least 1"),
        (("--space", "smoke", "--grace-period", "4"), "--max-epochs 3 is below the ASHA grace period 4"),
        (("--space", "grid_losses", "--grace-period", "1"), "has no ASHA"),
        (("--space", "smoke", "--checkpoint-every", "0"), "--checkpoint-every must be at least 1"),
        (("--space", "smoke", "--checkpoint-every", "two"), "invalid int value: 'two'"),
        # found by the data loading, which runs while Ray starts
        (("--space", "smoke", "--val-size", "4000"), "leaves no training image out of the 640-image subset"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, ray_tmp: Path, args: tuple[str, ...], message: str) -> None:
    cmd = search_cmd(*args, "--storage-path", str(tmp_path))
    done = subprocess.run(cmd, cwd=REPO, env=study_env(ray_tmp), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--space", "smoke", "--storage-path", "/proc/studies"),
            "--storage-path /proc/studies: cannot write in /proc",
        ),
        (("--space", "full", "--max-epochs", "5", "--storage-path", "."), "warmup_epochs must be in [0, 4], got 5"),
    ],
)
def test_refused_before_data_or_ray(tmp_path: Path, ray_tmp: Path, args: tuple[str, ...], message: str) -> None:
    """Found at start, in one line: not after loading data and starting Ray, not as a trial's error."""
    done = subprocess.run(search_cmd(*args), cwd=tmp_path, env=study_env(ray_tmp), capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_malformed_space_file_names_the_key(tmp_path: Path, ray_tmp: Path) -> None:
    space = tmp_path / "bad.yaml"
    space.write_text("max_epochs: 2\nparams:\n  lr: {loguniform: [0.1, 0.001]}\n")
    done = subprocess.run(
        search_cmd("--space", str(space), "--storage-path", str(tmp_path / "studies")),
        cwd=REPO,
        env=study_env(ray_tmp),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert str(space) in done.stderr and "params.lr" in done.stderr and "low 0.1 > high 0.001" in done.stderr


def test_unreachable_address_is_one_line(tmp_path: Path, ray_tmp: Path) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    cmd = search_cmd("--space", "smoke", "--address", address, "--storage-path", str(tmp_path))
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=REPO, env=study_env(ray_tmp), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"--address {address}: cannot reach a Ray cluster there" in done.stderr
    assert time.monotonic() - started < 60


def test_searcher_tells_optuna_the_right_states_and_survives_a_lagging_checkpoint(tmp_path: Path) -> None:
    """StudySearch against a real SQLite study, driven as Ray drives it, without a cluster.

    The driver "dies" after the searcher's last checkpoint, having asked one more trial (an
    orphan) and finished one more (told in the database, live in the checkpoint); the restored
    searcher must reuse the orphan, leave the told trial alone, and retry the errored one.
    """
    import pickle

    from tune_cifar import searcher as search_mod
    from tune_cifar import spaces

    space = spaces.load("smoke")
    search = search_mod.StudySearch(space, StudyContext(tmp_path, "unit", 8), seed=0)
    as_built = pickle.dumps(search)  # what Ray keeps in tuner.pkl

    def result(epoch: int, value: float) -> dict:
        final = value + 0.01 if epoch == 3 else None  # e.g. an SWA average, evaluated after the last epoch
        return {"epoch": epoch, "val_acc": value, "config/epochs": 3, "trial/final_val_acc": final}

    configs = {ray_id: search.suggest(ray_id) for ray_id in ("a", "b", "c", "f")}
    assert all(set(config) >= {"optimizer", "lr", "epochs", "seed", "model"} for config in configs.values())
    for epoch in (1, 2):
        search.on_trial_result("a", result(epoch, 0.1 * epoch))
    search.on_trial_complete("a", result(3, 0.5))  # ran all epochs: COMPLETE
    search.on_trial_complete("b", result(1, 0.05))  # stopped by ASHA at epoch 1: PRUNED
    search.on_trial_result("c", result(1, 0.2))
    search.on_trial_complete("c", error=True)  # failed for good (so far)
    search.on_trial_result("f", result(1, 0.3))
    checkpoint = tmp_path / "searcher-state.pkl"
    search.save(str(checkpoint))
    search.on_trial_complete("f", result(3, 0.6))  # after the checkpoint
    orphan_config = search.suggest("e")  # after the checkpoint: Ray will not know "e"

    study = optuna.load_study(study_name="unit", storage=StudyFolder(tmp_path).optuna_url)
    states = {t.user_attrs["ray_trial_id"]: t for t in study.get_trials()}
    assert states["a"].state == optuna.trial.TrialState.COMPLETE and states["a"].value == pytest.approx(0.51)
    assert states["a"].intermediate_values == {1: 0.1, 2: 0.2, 3: 0.5}
    assert states["b"].state == optuna.trial.TrialState.PRUNED and states["b"].intermediate_values == {1: 0.05}
    assert states["b"].value == 0.05
    assert states["c"].state == optuna.trial.TrialState.RUNNING  # not told until the study ends

    restored = pickle.loads(as_built)
    restored.restore(str(checkpoint))
    reused = restored.suggest("g")
    assert reused == orphan_config  # the orphan's sampled values, now for Ray trial "g"
    restored.on_trial_result("f", result(2, 0.45))  # "f" resumes from its checkpoint ...
    restored.on_trial_complete("f", result(3, 0.6))  # ... and is not told twice
    restored.on_trial_result("c", result(2, 0.25))  # the errored trial, retried by --resume
    restored.on_trial_complete("c", result(3, 0.35))
    restored.on_trial_complete("g", result(1, 0.01))
    restored.save(str(checkpoint))  # as Ray does when the experiment ends: the helper's writes are in
    assert optuna_db.finish_study("unit", StudyFolder(tmp_path)) == 0

    trials = optuna.load_study(study_name="unit", storage=StudyFolder(tmp_path).optuna_url).get_trials()
    by_ray = {t.user_attrs["ray_trial_id"]: t for t in trials}
    assert len(trials) == 5 and set(by_ray) == {"a", "b", "c", "f", "g"}  # every Ray trial exactly once
    assert by_ray["f"].state == optuna.trial.TrialState.COMPLETE and by_ray["f"].value == pytest.approx(0.61)
    assert by_ray["c"].state == optuna.trial.TrialState.COMPLETE and by_ray["c"].intermediate_values == {
        1: 0.2,
        2: 0.25,
        3: 0.35,
    }
    assert by_ray["g"].state == optuna.trial.TrialState.PRUNED


def test_errored_trials_fail_when_the_study_ends(tmp_path: Path) -> None:
    from tune_cifar import searcher as search_mod
    from tune_cifar import spaces

    search = search_mod.StudySearch(spaces.load("smoke"), StudyContext(tmp_path, "errors", 8), seed=1)
    search.suggest("x")
    search.on_trial_complete("x", error=True)
    search.save(str(tmp_path / "searcher.pkl"))  # as Ray does when the experiment ends: the helper's writes are in
    assert optuna_db.finish_study("errors", StudyFolder(tmp_path)) == 1
    (trial,) = optuna.load_study(study_name="errors", storage=StudyFolder(tmp_path).optuna_url).get_trials()
    assert trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs["stop_reason"] == "error"


def test_a_failed_trial_stays_failed_when_a_finished_study_resumes(tmp_path: Path) -> None:
    """A finished study told its errored trial FAIL; ``--resume --num-samples N`` retries it (Ray
    resumes errored trials): its reports must not touch the closed Optuna trial."""
    import pickle

    from tune_cifar import searcher as search_mod
    from tune_cifar import spaces

    study = StudyContext(tmp_path, "grown", 8)
    search = search_mod.StudySearch(spaces.load("smoke"), study, seed=1)
    search.suggest("x")
    search.on_trial_result("x", {"epoch": 1, "val_acc": 0.1})
    search.on_trial_complete("x", error=True)
    checkpoint = tmp_path / "searcher-state.pkl"
    search.save(str(checkpoint))
    assert optuna_db.finish_study(study.name, study.folder) == 1
    restored = pickle.loads(pickle.dumps(search))
    restored.restore(str(checkpoint))
    restored.on_trial_result("x", {"epoch": 2, "val_acc": 0.2})
    restored.on_trial_complete("x", {"epoch": 3, "val_acc": 0.3, "config/epochs": 3})
    (trial,) = optuna.load_study(study_name="grown", storage=StudyFolder(tmp_path).optuna_url).get_trials()
    assert trial.state == optuna.trial.TrialState.FAIL and trial.intermediate_values == {1: 0.1}


def test_searcher_limits_concurrency_itself(tmp_path: Path) -> None:
    from tune_cifar import searcher as search_mod
    from tune_cifar import spaces

    search = search_mod.StudySearch(spaces.load("smoke"), StudyContext(tmp_path, "limit", 8), seed=0, max_concurrent=2)
    assert search.suggest("a") is not None and search.suggest("b") is not None
    assert search.suggest("c") is None  # two live trials already
    search.on_trial_complete("a", {"epoch": 1, "val_acc": 0.1, "config/epochs": 3})
    assert search.suggest("c") is not None


def _wait_for(path: Path, driver: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert driver.poll() is None, f"the driver ended first: {driver.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_killed_in_start_up_resumes_and_one_driver_holds_the_study(tmp_path: Path, ray_tmp: Path) -> None:
    """13.4, 13.1, 11.3: a driver killed before Ray saved anything leaves a study that the same command
    plus --resume starts; while it runs, a second --resume and a new study of that name are refused."""
    env = study_env(ray_tmp)
    original = search_cmd("--space", "smoke", "--data", "synthetic", "--name", "s", "--storage-path", str(tmp_path),
                          "--wandb", "disabled")  # fmt: skip
    folder = tmp_path / "s"
    first = subprocess.Popen(original, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(folder / "study.json", first)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    assert not (folder / "tuner.pkl").exists()  # killed in start-up: no Ray state

    resumed = subprocess.Popen([*original, "--resume"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait_for(folder / "tuner.pkl", resumed)
    second = subprocess.run(search_cmd("--resume", "--name", "s", "--storage-path", str(tmp_path)), cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert f"in use by driver pid {resumed.pid}" in second.stderr
    again = subprocess.run(original, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "exists already" in again.stderr
    out, err = resumed.communicate(timeout=420)
    assert resumed.returncode == 0, out[-2000:] + err[-3000:]
    assert "never started: starting it" in out

    trials = pd.read_parquet(folder / "trials")
    epochs = pd.read_parquet(folder / "epochs")
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert len(trials) == SMOKE_TRIALS and trials["trial_id"].is_unique
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    assert len(study.trials) == SMOKE_TRIALS and all(t.state.is_finished() for t in study.trials)
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    assert pruned == (trials["status"] == "STOPPED").sum()

    before = _files(folder)
    refused = subprocess.run([*original, "--resume", "--max-epochs", "5"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 2 and "--max-epochs 5: the study was started with 3" in refused.stderr
    assert _files(folder) == before  # byte for byte


def test_two_drivers_started_together_one_runs_one_is_refused(tmp_path: Path, ray_tmp: Path) -> None:
    space = tmp_path / "tiny.yaml"
    tiny = REPRODUCIBLE_SPACE.replace("num_samples: 12", "num_samples: 2").replace("max_epochs: 2", "max_epochs: 1")
    space.write_text(tiny)
    command = search_cmd("--space", str(space), "--name", "t", "--storage-path", str(tmp_path / "s"))
    command += ["--wandb", "disabled"]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    drivers = [subprocess.Popen(command, cwd=REPO, env=study_env(ray_tmp), **pipes) for _ in range(2)]
    results = [(*driver.communicate(timeout=300), driver.returncode) for driver in drivers]
    results = [(code, out, err) for out, err, code in results]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, _, err in results if code == 2)
    assert refused.count("\n") == 1 and ("in use by driver pid" in refused or "exists already" in refused)
    assert "Traceback" not in refused
    assert len(pd.read_parquet(tmp_path / "s" / "t" / "trials")) == 2


def test_resume_with_more_samples_adds_trials_and_never_shrinks(tmp_path: Path, ray_tmp: Path) -> None:
    """11.3: ``--resume --num-samples N`` on a finished 3-trial study runs N - 3 more trials, each once in
    Ray, Parquet and Optuna (whose new trials TPE samples from the same database); the summary counts
    the whole study; fewer trials than the study has is refused, leaving it as it was."""
    space = tmp_path / "grow.yaml"
    space.write_text(REPRODUCIBLE_SPACE.replace("num_samples: 12", "num_samples: 3"))
    command = search_cmd("--space", str(space), "--name", "g", "--storage-path", str(tmp_path / "s"))
    command += ["--wandb", "disabled", "--max-concurrent", "1"]
    first = subprocess.run(command, cwd=REPO, env=study_env(ray_tmp), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    folder = tmp_path / "s" / "g"
    grown = subprocess.run([*command, "--resume", "--num-samples", "5"], cwd=REPO, env=study_env(ray_tmp),
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert grown.returncode == 0, grown.stdout[-3000:] + grown.stderr[-3000:]
    assert "study g: 5 trials" in grown.stdout

    from ray.tune import ExperimentAnalysis

    ray_ids = {t.trial_id for t in ExperimentAnalysis(str(folder)).trials}
    trials = pd.read_parquet(folder / "trials")
    study = optuna.load_study(study_name="g", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert len(ray_ids) == 5 and set(trials["trial_id"]) == ray_ids and trials["trial_id"].is_unique
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3, 4]
    assert {t.user_attrs["ray_trial_id"] for t in study.trials} == ray_ids
    assert all(t.state.is_finished() for t in study.trials)
    assert json.loads((folder / "study.json").read_text())["num_samples"] == 5

    before = _files(folder)
    shrunk = subprocess.run([*command, "--resume", "--num-samples", "2"], cwd=REPO, env=study_env(ray_tmp),
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert shrunk.returncode == 2 and "--num-samples 2: the study was started with 5" in shrunk.stderr
    assert shrunk.stderr.count("\n") == 1
    assert _files(folder) == before


def test_a_refused_trial_configuration_is_a_row_not_a_dead_study() -> None:
    """The driver-side row of a trial whose sampled values the vocabulary refuses (warm-up as long as
    the run) is recorded as sampled: the trial fails alone (ERROR), the callbacks do not raise.
    A plain object stands in for Ray's Trial: the callback reads only ``config`` and ``trial_id``."""
    from types import SimpleNamespace

    from tune_cifar.errors import UsageError
    from tune_cifar.ray_trial import hyperparameter_row

    trial = SimpleNamespace(trial_id="bad", config={"epochs": 5, "warmup_epochs": 5, "filters": [8, 16, 32]})
    with pytest.raises(UsageError, match="warmup_epochs must be in"):
        cfg.from_dict({"epochs": 5, "warmup_epochs": 5})
    row = hyperparameter_row(trial)
    assert row["warmup_epochs"] == 5 and row["epochs"] == 5 and row["filters"] == "8,16,32"
    assert set(row) == set(cfg.KEYS)


DIVERGING_SPACE = """
description: SGD without batch norm at two learning rates; at lr 9 the training loss is NaN within two epochs
max_epochs: 4
data: {source: synthetic, subset: 300, val_size: 30}
asha: null
fixed: {model: conditioned_cnn, filters: "8,16,32", batchnorm: false, optimizer: sgd, batch_size: 32, augment: false}
grid: {lr: [0.01, 9.0]}
"""


def test_a_diverging_trial_stops_there_and_a_wandb_failure_is_one_warning(tmp_path: Path, ray_tmp: Path) -> None:
    """19.4: the trial whose training loss turns non-finite trains no further epoch and is DIVERGED in
    the trials table, PRUNED in Optuna (with the reason), counted on the console and left out of the
    factor table's mean, saying so; the other trial runs its four epochs.
    The same study (a study costs seconds of Ray's start and stop) shows that W&B is a view: a real
    W&B failure in its process (online without an API key; W&B's server pointed at a closed
    loopback port, so nothing leaves the machine) prints one warning line, and the study goes on."""
    space = tmp_path / "diverge.yaml"
    space.write_text(DIVERGING_SPACE)
    home = tmp_path / "home"  # no W&B login here
    home.mkdir()
    env = study_env(ray_tmp, HOME=str(home), WANDB_BASE_URL=f"http://127.0.0.1:{free_port()}")
    command = search_cmd("--space", str(space), "--name", "d", "--storage-path", str(tmp_path), "--wandb", "online")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    warnings = [line for line in done.stdout.splitlines() if line.startswith("warning: W&B logging stopped")]
    assert len(warnings) == 1 and "API key" in warnings[0], done.stdout[-3000:]
    trials = pd.read_parquet(tmp_path / "d" / "trials").set_index("lr")
    lost, kept = trials.loc[9.0], trials.loc[0.01]
    assert (lost["status"], lost["stop_reason"]) == ("DIVERGED", "diverged") and lost["epochs_run"] < 4
    assert (kept["status"], kept["epochs_run"]) == ("TERMINATED", 4)
    epochs = pd.read_parquet(tmp_path / "d" / "epochs")
    curve = epochs[epochs["trial_id"] == lost["trial_id"]].sort_values("epoch")
    assert len(curve) == lost["epochs_run"] and not math.isfinite(curve["train_loss"].iloc[-1])
    assert curve["train_loss"].iloc[:-1].map(math.isfinite).all()  # it stopped at the first non-finite epoch
    stored = optuna.load_study(study_name="d", storage=StudyFolder(tmp_path / "d").optuna_url).get_trials()
    by_attr = {trial.user_attrs["stop_reason"]: trial.state for trial in stored}
    assert by_attr == {"diverged": optuna.trial.TrialState.PRUNED, "completed": optuna.trial.TrialState.COMPLETE}
    assert "study d: 2 trials (1 ran all epochs, 0 stopped by ASHA, 1 diverged, 0 errors)" in done.stdout

    from tune_cifar.analysis import _study, best_config

    table = best_config.factor_table(_study.load_study(tmp_path / "d"), "lr")
    assert table.set_index("lr").loc[9.0, "trials"] == 0 and table.set_index("lr").loc[9.0, "diverged"] == 1
    shown = best_config.shown_factor_table(table, "lr")
    assert "0 (1 of 1 diverged, left out)" in set(shown["trials"])


@pytest.mark.parametrize(
    ("signum", "delay_s", "code"),
    [(signal.SIGINT, 4.0, 130), (signal.SIGINT, None, 130), (signal.SIGTERM, 1.0, 143), (signal.SIGTERM, None, 143)],
    ids=["ctrl-c-4s", "ctrl-c-mid-study", "sigterm-1s", "sigterm-mid-study"],
)
def test_a_signal_to_the_process_group_at_any_moment_stops_cleanly_and_resume_finishes_every_trial_once(
    tmp_path: Path, ray_tmp: Path, signum: int, delay_s: float | None, code: int
) -> None:
    """19.1, 19.2: Ctrl-C (SIGINT) or SIGTERM (what SLURM, Kubernetes and ``ray job stop`` send) to the
    driver's whole process group, as a terminal or a scheduler sends it: 1 s or 4 s after study.json
    appeared (the data loading, Ray starting: a Ctrl-C inside ray.init once crashed the driver at
    exit) or mid-study (delay None: once an epoch is written).
    Its exit code, no native stack dump, the --resume line last; then --resume runs every trial
    exactly once (Ray, Parquet, Optuna)."""
    space = tmp_path / "term.yaml"
    # 8 trials one at a time: still running 4 s after study.json on a machine where Ray starts quickly
    # (with 4 the whole study once ended before the signal)
    trials_n = 8
    space.write_text(REPRODUCIBLE_SPACE.replace("num_samples: 12", f"num_samples: {trials_n}"))
    args = ("--space", str(space), "--name", "t", "--storage-path", str(tmp_path / "s"), "--max-concurrent", "1")
    args += ("--wandb", "disabled")
    driver = subprocess.Popen(search_cmd(*args), cwd=REPO, env=study_env(ray_tmp), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    folder = tmp_path / "s" / "t"
    _wait_for(folder / ("study.json" if delay_s is not None else "epochs"), driver)
    time.sleep(delay_s or 0.0)
    sent = time.monotonic()
    os.killpg(driver.pid, signum)
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == code, out[-2000:] + err[-3000:]
    assert time.monotonic() - sent < 30, "stopped, but not within seconds"
    assert "SIGTERM received" not in out + err and "PC: @" not in out + err
    last = out.strip().splitlines()[-1]
    assert "continue with: " in last and last.endswith(f"--resume --name t --storage-path {tmp_path / 's'}"), last

    resumed = subprocess.run(search_cmd(*args, "--resume"), cwd=REPO, env=study_env(ray_tmp), capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    trials = pd.read_parquet(folder / "trials")
    epochs = pd.read_parquet(folder / "epochs")
    assert len(trials) == trials_n and trials["trial_id"].is_unique
    assert set(trials["status"]) <= {"TERMINATED", "STOPPED"}
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    stored = optuna.load_study(study_name="t", storage=StudyFolder(folder).optuna_url).get_trials()
    assert len(stored) == trials_n and all(trial.state.is_finished() for trial in stored)
