"""The Parquet tables as a pandas user reads them: ``pandas.read_parquet(folder / NAME)``, nothing else.

Two real trials are trained (one epoch of a narrow CNN on synthetic images) and written with the
project's own TableWriter, plus a third trial's row as the study writes it when the trial starts
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
    TableWriter,
    TrialRecord,
    apply,
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
    tables = TableWriter.open(root)
    for trial_id, config in configs.items():
        trainer = Trainer(config, splits)
        record = tables.record(trial_id)
        report = trainer.train_epoch()
        record.add("epochs", [report.epoch])
        record.add("layers", report.layers)
        record.trial = {**cfg.to_row(config), **trainer.finish(), "status": "TERMINATED", "stop_reason": "completed"}
        tables.write()
    started = tables.record("started")  # on_trial_start: no result yet, so epochs_run, macs, ... are null
    started.trial = {**cfg.to_row(configs["adam"]), "status": "RUNNING"}
    tables.write()
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


# -- the writer: round files while a study runs, one file per trial once merged (issue 23) --------
def _report(record: TrialRecord, epoch: int, value: float, status: str = "RUNNING") -> None:
    """One epoch's report as the driver adds it: an epochs row, two layer rows, the trial's row."""
    record.add("epochs", [{"epoch": epoch, "val_acc": value}])
    layers = [{"epoch": epoch, "layer": f"conv{i}.weight", "layer_index": i, "kind": "weight", "numel": 9}
              for i in range(2)]  # fmt: skip
    record.add("layers", layers)
    record.trial = {"status": status, "epochs_run": epoch}


def _files(root: Path, name: str) -> list[str]:
    return sorted(part.name for part in (root / name).glob("*.parquet"))


def _once(root: Path, trial_id: str = "t") -> pd.DataFrame:
    """A trial's rows of the epochs table as pandas reads it, asserted free of a (trial, epoch) twice."""
    epochs = pd.read_parquet(root / "epochs")
    assert not epochs.duplicated(["trial_id", "epoch"]).any(), epochs
    return epochs[epochs["trial_id"] == trial_id].sort_values("epoch")


def test_a_round_writes_every_trials_new_epochs_in_one_file_per_table(tmp_path: Path) -> None:
    """A round costs a few files however many trials reported, and a report's cost does not grow
    with the trial: earlier rounds' files are never rewritten, and the driver keeps no rows."""
    tables = TableWriter.open(tmp_path)
    for epoch in (1, 2):
        for trial_id in ("a", "b", "c"):
            _report(tables.record(trial_id), epoch, epoch / 10)
        tables.write()
    inodes = {part: part.stat().st_ino for part in tmp_path.rglob("round-*.parquet")}
    _report(tables.record("a"), 3, 0.3)
    _report(tables.record("b"), 3, 0.3)
    ops = tables.changes()
    # the epochs first, the running trials' rows after them (never epochs_run ahead of the epochs table)
    assert [str(op.path) for op in ops] == [
        "epochs/round-00000003.parquet", "layers/round-00000003.parquet", "trials/live.parquet"
    ]  # fmt: skip
    assert [len(op.rows or ()) for op in ops] == [2, 4, 3]
    apply(tmp_path, ops)
    assert not any(record.pending[name] for record in tables.records.values() for name in record.pending)
    assert {part: part.stat().st_ino for part in inodes} == inodes
    assert _files(tmp_path, "epochs") == [f"round-0000000{n}.parquet" for n in (1, 2, 3)]
    assert _once(tmp_path, "a")["val_acc"].tolist() == [0.1, 0.2, 0.3]
    assert len(pd.read_parquet(tmp_path / "layers")) == 16
    epochs_run = pd.read_parquet(tmp_path / "trials").set_index("trial_id")["epochs_run"]
    assert epochs_run.to_dict() == {"a": 3, "b": 3, "c": 2}
    assert tables.changes() == []  # nothing new: nothing written


def test_a_finished_trials_row_moves_to_its_own_file_written_before_the_live_one_lets_it_go(tmp_path: Path) -> None:
    tables = TableWriter.open(tmp_path)
    for trial_id in ("a", "b"):
        _report(tables.record(trial_id), 1, 0.1)
    tables.write()
    tables.record("a").trial = {"status": "TERMINATED", "epochs_run": 1}
    ops = tables.changes()
    assert [(str(op.path), [row["trial_id"] for row in op.rows or ()]) for op in ops] == [
        ("trials/part-a.parquet", ["a"]), ("trials/live.parquet", ["b"])
    ]  # fmt: skip
    apply(tmp_path, ops[:1])  # the moment between the two: the row in both files, the newer one read
    assert len(pd.read_parquet(tmp_path / "trials")) == 3
    status = read_table(tmp_path, "trials").set_index("trial_id")["status"]
    assert status.to_dict() == {"a": "TERMINATED", "b": "RUNNING"}
    apply(tmp_path, ops[1:])
    assert pd.read_parquet(tmp_path / "trials").set_index("trial_id")["status"].to_dict() == {
        "a": "TERMINATED", "b": "RUNNING"
    }  # fmt: skip
    tables.record("b").trial = {"status": "STOPPED", "epochs_run": 1}
    tables.write()
    # no trial running: the live file stays, empty, until the merge (a reader finds what it listed)
    assert _files(tmp_path, "trials") == ["live.parquet", "part-a.parquet", "part-b.parquet"]
    assert len(pd.read_parquet(tmp_path / "trials" / "live.parquet")) == 0
    tables.compact()
    assert _files(tmp_path, "trials") == ["part-a.parquet", "part-b.parquet"]


def test_a_retried_epoch_moves_to_the_new_round_and_a_restore_drops_later_epochs(tmp_path: Path) -> None:
    tables = TableWriter.open(tmp_path)
    for epoch in (1, 2, 3):
        _report(tables.record("t"), epoch, epoch / 10)
        _report(tables.record("u"), epoch, epoch / 10)
        tables.write()
    tables.record("t").drop_after(1)  # restored from the checkpoint of epoch 1
    _report(tables.record("t"), 2, 0.25)
    ops = tables.changes()
    assert str(ops[0].path) == "epochs/round-00000004.parquet"  # the new copy before the old one goes
    assert {str(op.path): op.drop for op in ops if op.drop} == {
        f"{name}/round-0000000{n}.parquet": frozenset({("t", n)})
        for name in ("epochs", "layers", "steps")
        for n in (2, 3)
    }  # fmt: skip
    apply(tmp_path, ops)
    assert _once(tmp_path)["val_acc"].tolist() == [0.1, 0.25]
    assert _once(tmp_path, "u")["val_acc"].tolist() == [0.1, 0.2, 0.3]  # the other trial's rows in those files stay
    assert sorted(read_table(tmp_path, "layers").query("trial_id == 't'")["epoch"]) == [1, 1, 2, 2]


def test_compact_leaves_one_file_per_trial_and_a_resumed_retry_moves_its_epoch_out(tmp_path: Path) -> None:
    tables = TableWriter.open(tmp_path)
    for epoch in (1, 2, 3):
        _report(tables.record("t"), epoch, epoch / 10)
        tables.write()
    assert tables.compact() == ["t"]
    assert _files(tmp_path, "epochs") == _files(tmp_path, "layers") == _files(tmp_path, "trials") == ["part-t.parquet"]
    assert _once(tmp_path)["val_acc"].tolist() == [0.1, 0.2, 0.3]
    resumed = TableWriter.open(tmp_path)  # --resume: the earlier driver's rows, then a retry of epoch 2
    record = resumed.record("t")
    assert record.trial["epochs_run"] == 3 and not record.rounds
    assert record.merged == {(name, e) for name in ("epochs", "layers") for e in (1, 2, 3)}
    assert [row["epoch"] for row in trial_rows(tmp_path, "layers", "t")] == [1, 1, 2, 2, 3, 3]
    record.drop_after(1)
    _report(record, 2, 0.22)
    resumed.write()
    assert _files(tmp_path, "epochs") == ["part-t.parquet", "round-00000001.parquet"]
    assert _once(tmp_path)["val_acc"].tolist() == [0.1, 0.22]
    assert TableWriter.open(tmp_path).compact() == ["t"]
    assert _files(tmp_path, "epochs") == ["part-t.parquet"] and _once(tmp_path)["val_acc"].tolist() == [0.1, 0.22]


def test_a_merge_cut_short_reads_once_and_the_next_driver_heals_it(tmp_path: Path) -> None:
    """A driver killed inside a merge leaves the merged file and the round files both: the
    project's reader keeps one copy of each row, and the next driver's first round leaves one."""
    tables = TableWriter.open(tmp_path)
    for epoch in (1, 2):
        _report(tables.record("t"), epoch, epoch / 10)
        tables.write()
    rows = trial_rows(tmp_path, "epochs", "t")
    write_atomic(to_arrow("epochs", rows), tmp_path / "epochs" / "part-t.parquet")  # the merge's first step
    assert len(pd.read_parquet(tmp_path / "epochs")) == 4  # what a plain reader sees in that moment
    assert read_table(tmp_path, "epochs")["epoch"].tolist() == [1, 2]
    resumed = TableWriter.open(tmp_path)
    assert resumed.record("t").rounds == {(name, e): e for name in ("epochs", "layers") for e in (1, 2)}
    assert resumed.record("t").unmerged == {("epochs", 1), ("epochs", 2)}  # only the table merged twice
    _report(resumed.record("t"), 3, 0.3)
    resumed.write()
    assert _once(tmp_path)["val_acc"].tolist() == [0.1, 0.2, 0.3]
    resumed.compact()
    assert _files(tmp_path, "epochs") == ["part-t.parquet"] and _once(tmp_path)["epoch"].tolist() == [1, 2, 3]


def test_compact_leaves_out_trials_the_study_does_not_know(tmp_path: Path) -> None:
    """Rows of a trial Ray never recorded (a driver died before its experiment state did) go with
    the round files; the known trials' rows, written by an earlier driver, are merged."""
    older = TableWriter.open(tmp_path)
    for trial_id in ("kept", "lost"):
        _report(older.record(trial_id), 1, 0.1)
    older.write()
    driver = TableWriter.open(tmp_path)
    _report(driver.record("kept"), 2, 0.2)
    assert driver.compact({"kept"}) == ["kept"]
    for name in ("epochs", "layers", "trials"):
        assert _files(tmp_path, name) == ["part-kept.parquet"]
    assert _once(tmp_path, "kept")["val_acc"].tolist() == [0.1, 0.2]


def test_a_driver_killed_while_removing_the_merged_rounds_loses_no_table(tmp_path: Path) -> None:
    """The merge at the end writes each trial's files, then removes the round files table by
    table: killed in between, the next driver takes the rounds still there as the newer copies of
    their own table only, and every table keeps every row."""
    tables = TableWriter.open(tmp_path)
    for epoch in (1, 2):
        _report(tables.record("t"), epoch, epoch / 10)
        tables.write()
    rounds = {name: sorted((tmp_path / name).glob("round-*.parquet")) for name in ("epochs", "layers")}
    saved = {path: path.read_bytes() for paths in rounds.values() for path in paths}
    tables.compact()
    for path in rounds["layers"]:  # as if killed after the epochs rounds went, before the layers rounds did
        path.write_bytes(saved[path])
    resumed = TableWriter.open(tmp_path)
    resumed.write()
    assert _once(tmp_path)["epoch"].tolist() == [1, 2]
    assert sorted(read_table(tmp_path, "layers")["epoch"]) == [1, 1, 2, 2]
    resumed.compact()
    assert _files(tmp_path, "epochs") == _files(tmp_path, "layers") == ["part-t.parquet"]
    assert _once(tmp_path)["epoch"].tolist() == [1, 2] and len(pd.read_parquet(tmp_path / "layers")) == 4


def test_a_trial_known_only_by_its_epochs_gets_no_empty_row(tmp_path: Path) -> None:
    """A driver killed between a round's epoch files and its trials row leaves epochs of a trial
    without a row: the next driver writes no row of nulls for it, only the row it is given."""
    older = TableWriter.open(tmp_path)
    older.record("t").add("epochs", [{"epoch": 1, "val_acc": 0.1}])
    apply(tmp_path, [op for op in older.changes() if op.table != "trials"])  # killed before the trials row
    resumed = TableWriter.open(tmp_path)
    resumed.write()
    assert not (tmp_path / "trials").exists() or len(pd.read_parquet(tmp_path / "trials")) == 0
    resumed.record("t").trial = {"status": "RUNNING", "epochs_run": 1}
    resumed.write()
    assert pd.read_parquet(tmp_path / "trials")["status"].tolist() == ["RUNNING"]
