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
from tune_cifar.tables import NULLABLE_TABLES, SCHEMAS, TrialRecord, read_table


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
        "adam": True, "sgd": False, "started": True
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
