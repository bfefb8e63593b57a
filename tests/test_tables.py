"""The Parquet tables as a pandas user reads them: ``pandas.read_parquet(folder / NAME)``, nothing else.

Two real trials are trained (one epoch of a narrow CNN on synthetic images) and written with the
project's own TrialRecord, plus a third trial's row as the study writes it when the trial starts
(hyperparameters only). Between them, integer and boolean columns hold both values and nulls.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tune_cifar import config as cfg
from tune_cifar.tables import (
    NULLABLE_TABLES,
    SCHEMAS,
    TrialRecord,
    apply,
    compact,
    read_table,
    to_arrow,
    trial_rows,
    write_atomic,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tune_cifar.data import load_splits
    from tune_cifar.engine import Trainer

    root = tmp_path_factory.mktemp("tables") / "run"
    splits = load_splits("synthetic", val_size=64, subset=320)
    small = {"filters": (4, 8, 16), "batch_size": 64, "epochs": 1, "augment": False}
    configs = {
        # adam, no scheduler: momentum, nesterov, step_size and gamma are inactive (null)
        "adam": cfg.TrainConfig(optimizer="adam", **small),
        # sgd with Nesterov momentum and a step schedule: the same columns set
        "sgd": cfg.TrainConfig(optimizer="sgd", nesterov=True, scheduler="step", step_size=7, **small),
    }
    for trial_id, config in configs.items():
        trainer = Trainer(config, splits)
        record = TrialRecord(trial_id)
        report = trainer.train_epoch()
        record.add("epochs", [report.epoch])
        record.add("layers", report.layers)
        record.trial = {**cfg.to_row(config), **trainer.finish(), "status": "TERMINATED", "stop_reason": "completed"}
        record.write(root)
    started = TrialRecord("started")  # on_trial_start: no result yet, so epochs_run, macs, ... are null
    started.trial = {**cfg.to_row(configs["adam"]), "status": "RUNNING"}
    started.write(root)
    return root


def test_nullable_integers_and_booleans_keep_their_type(folder: Path) -> None:
    trials = pd.read_parquet(folder / "trials").set_index("trial_id")
    assert str(trials["step_size"].dtype) == "Int64"  # not float64 (7 → 7.0)
    assert trials.loc["sgd", "step_size"] == 7 and trials["step_size"].isna().to_dict() == {
        "adam": True,
        "sgd": False,
        "started": True,
    }
    assert str(trials["nesterov"].dtype) == "boolean"  # not object
    assert bool(trials.loc["sgd", "nesterov"]) and pd.isna(trials.loc["adam", "nesterov"])
    assert str(trials["epochs_run"].dtype) == "Int64" and pd.isna(trials.loc["started", "epochs_run"])
    assert trials.loc["adam", "epochs_run"] == 1 and trials.loc["sgd", "macs"] > 0
    assert str(trials["batchnorm"].dtype) == "boolean" and str(trials["batch_size"].dtype) == "Int64"
    assert str(trials["lr"].dtype) == "float64"


def test_every_column_reads_as_its_schema_says(folder: Path) -> None:
    """int64 → Int64 and bool → boolean in the tables where a null can occur, numpy int64 elsewhere."""
    for name in ("trials", "epochs", "layers"):
        frame = pd.read_parquet(folder / name)
        assert list(frame.columns) == SCHEMAS[name].names
        for field in SCHEMAS[name]:
            dtype = str(frame[field.name].dtype)
            if str(field.type) == "int64":
                assert dtype == ("Int64" if name in NULLABLE_TABLES else "int64"), (name, field.name)
            elif str(field.type) == "bool":
                assert dtype == "boolean", (name, field.name)
            elif str(field.type) == "double":
                assert dtype == "float64", (name, field.name)
    # the project's own reader gives the same frame
    pd.testing.assert_frame_equal(read_table(folder, "trials"), pd.read_parquet(folder / "trials"))


# -- the writer: one file per epoch while a trial runs, one per trial once merged (issue 23) -----
def _report(record: TrialRecord, epoch: int, value: float) -> None:
    """One epoch's report as the driver adds it: an epochs row, two layer rows, the trial's row."""
    record.add("epochs", [{"epoch": epoch, "val_acc": value}])
    layers = [{"epoch": epoch, "layer": f"conv{i}.weight", "layer_index": i, "kind": "weight", "numel": 9}
              for i in range(2)]  # fmt: skip
    record.add("layers", layers)
    record.trial = {"status": "RUNNING", "epochs_run": epoch}


def _files(root: Path, name: str) -> list[str]:
    return sorted(part.name for part in (root / name).glob("*.parquet"))


def _once(root: Path) -> pd.DataFrame:
    """The epochs table as pandas reads it, asserted free of a (trial, epoch) twice."""
    epochs = pd.read_parquet(root / "epochs")
    assert not epochs.duplicated(["trial_id", "epoch"]).any(), epochs
    return epochs.sort_values("epoch")


def test_a_report_writes_its_own_epoch_and_never_an_earlier_one(tmp_path: Path) -> None:
    """A report's cost does not grow with the trial: it writes its epoch's files and the trial's row."""
    record = TrialRecord("t")
    _report(record, 1, 0.1)
    first = [str(op.path) for op in record.changes()]
    # a new trial's row first: a trial without one has no files, so a driver need not list folders for it
    assert first == ["trials/part-t.parquet", "epochs/part-t.e00001.parquet", "layers/part-t.e00001.parquet"]
    _report(record, 1, 0.1)
    for epoch in (2, 3):
        _report(record, epoch, epoch / 10)
        record.write(tmp_path)
    inodes = {part: part.stat().st_ino for part in tmp_path.rglob("*.e0000[12].parquet")}
    _report(record, 4, 0.4)
    ops = record.changes()
    written = [str(op.path) for op in ops if op.rows is not None]
    # later rows after the epochs they count: a reader never sees epochs_run ahead of the epochs table
    assert written == ["epochs/part-t.e00004.parquet", "layers/part-t.e00004.parquet", "trials/part-t.parquet"]
    apply(tmp_path, ops)
    assert not any(record.pending.values())  # the driver keeps no trial's history once it is on disk
    assert {part: part.stat().st_ino for part in inodes} == inodes  # earlier epochs' files never replaced
    assert _files(tmp_path, "epochs") == [f"part-t.e0000{e}.parquet" for e in (1, 2, 3, 4)]
    assert _once(tmp_path)["val_acc"].tolist() == [0.1, 0.2, 0.3, 0.4]
    assert len(pd.read_parquet(tmp_path / "layers")) == 8


def test_a_retried_epoch_replaces_its_file_and_later_epochs_go(tmp_path: Path) -> None:
    record = TrialRecord("t")
    for epoch in (1, 2, 3):
        _report(record, epoch, epoch / 10)
        record.write(tmp_path)
    record.drop_after(1)  # restored from the checkpoint of epoch 1
    _report(record, 2, 0.25)
    record.write(tmp_path)
    assert _files(tmp_path, "epochs") == ["part-t.e00001.parquet", "part-t.e00002.parquet"]
    assert _once(tmp_path)["val_acc"].tolist() == [0.1, 0.25]
    assert sorted(read_table(tmp_path, "layers")["epoch"]) == [1, 1, 2, 2]


def test_compact_leaves_one_file_per_trial_and_a_resumed_retry_moves_its_epoch_out(tmp_path: Path) -> None:
    record = TrialRecord("t")
    for epoch in (1, 2, 3):
        _report(record, epoch, epoch / 10)
        record.write(tmp_path)
    record.compact(tmp_path)
    assert _files(tmp_path, "epochs") == _files(tmp_path, "layers") == ["part-t.parquet"]
    assert _once(tmp_path)["val_acc"].tolist() == [0.1, 0.2, 0.3]
    resumed = TrialRecord.load(tmp_path, "t")  # --resume: the earlier driver's rows, then a retry of epoch 2
    assert resumed.trial["epochs_run"] == 3 and resumed.merged == {1, 2, 3} and not resumed.written
    assert [row["epoch"] for row in trial_rows(tmp_path, "layers", "t")] == [1, 1, 2, 2, 3, 3]
    resumed.drop_after(1)
    _report(resumed, 2, 0.22)
    resumed.write(tmp_path)
    assert _files(tmp_path, "epochs") == ["part-t.e00002.parquet", "part-t.parquet"]
    assert _once(tmp_path)["val_acc"].tolist() == [0.1, 0.22]
    assert compact(tmp_path) == ["t"]
    assert _files(tmp_path, "epochs") == ["part-t.parquet"] and _once(tmp_path)["val_acc"].tolist() == [0.1, 0.22]


def test_a_merge_cut_short_reads_once_and_the_next_write_heals_it(tmp_path: Path) -> None:
    """A driver killed inside a merge leaves the merged file and the per-epoch files both: the
    project's reader keeps one copy of each row, and the resumed driver's first write leaves one."""
    record = TrialRecord("t")
    for epoch in (1, 2):
        _report(record, epoch, epoch / 10)
        record.write(tmp_path)
    rows = trial_rows(tmp_path, "epochs", "t")
    write_atomic(to_arrow("epochs", rows), tmp_path / "epochs" / "part-t.parquet")  # the merge's first step
    assert len(pd.read_parquet(tmp_path / "epochs")) == 4  # what a plain reader sees in that moment
    assert read_table(tmp_path, "epochs")["epoch"].tolist() == [1, 2]
    resumed = TrialRecord.load(tmp_path, "t")
    _report(resumed, 3, 0.3)
    resumed.write(tmp_path)
    assert _once(tmp_path)["val_acc"].tolist() == [0.1, 0.2, 0.3]
    compact(tmp_path)
    assert _files(tmp_path, "epochs") == ["part-t.parquet"] and _once(tmp_path)["epoch"].tolist() == [1, 2, 3]


def test_compact_merges_epoch_files_the_drivers_record_does_not_know(tmp_path: Path) -> None:
    """Epoch files the driver's record was never told of (an older driver's, written before its
    trials row) are merged with the rest at the end, not left to shadow the merged rows."""
    older = TrialRecord("t")
    for epoch in (1, 2):
        _report(older, epoch, epoch / 10)
        older.write(tmp_path)
    driver = TrialRecord("t")  # as a driver holds a trial it did not load from disk
    _report(driver, 3, 0.3)
    driver.write(tmp_path)
    assert compact(tmp_path, {"t": driver}) == ["t"]
    assert _files(tmp_path, "epochs") == _files(tmp_path, "layers") == ["part-t.parquet"]
    assert _once(tmp_path)["val_acc"].tolist() == [0.1, 0.2, 0.3]
