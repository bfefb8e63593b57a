"""The Parquet tables every run and study leaves behind, and their atomic writer.

A results folder holds one directory per table (``trials``, ``epochs``, ``layers``, ``steps``),
each a Parquet dataset with one part file per trial, so ``pandas.read_parquet(folder / NAME)``
reads the whole table. A trial's part file is rewritten whole (temp file + rename) each time
the trial reports, which gives the two guarantees the study needs:

* a reader never sees a half-written file (pyarrow skips names starting with ``.``);
* a retried or resumed trial replaces its rows by ``(trial_id, epoch)`` instead of appending
  duplicates.

The schemas are explicit so that a column that is null in one trial (an inactive
hyperparameter) and set in another still reads back as one type.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tune_cifar import config as cfg
from tune_cifar.errors import UsageError
from tune_cifar.outcome import FINISHED_STATUSES, Outcome
from tune_cifar.report import EPOCH_COLUMNS
from tune_cifar.study_folder import StudyFolder

_ARROW_TYPES = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}


def _config_fields() -> list[pa.Field]:
    fields = []
    for key in cfg.KEYS:
        kind = cfg.field_type(key)
        fields.append(pa.field(key, pa.string() if key == "filters" else _ARROW_TYPES[kind]))
    return fields


SCHEMAS: dict[str, pa.Schema] = {
    "trials": pa.schema(
        [
            ("trial_id", pa.string()),
            ("study", pa.string()),
            *_config_fields(),
            ("status", pa.string()),  # RUNNING, TERMINATED (ran all epochs), STOPPED (by ASHA), ERROR
            ("stop_reason", pa.string()),  # completed, asha, error: ..., interrupted
            ("epochs_run", pa.int64()),
            ("best_val_acc", pa.float64()),
            ("best_epoch", pa.int64()),
            ("final_val_acc", pa.float64()),  # after the last epoch (of the SWA model when swa_epochs > 0)
            ("test_acc", pa.float64()),  # only a single run / the retrain evaluates test; null in a study
            ("test_loss", pa.float64()),
            ("macs", pa.int64()),
            ("params", pa.int64()),
            ("grad_health", pa.string()),  # ok, vanishing or exploding: worst over all epochs and layers
            ("data", pa.string()),
            ("train_images", pa.int64()),
            ("val_images", pa.int64()),  # 0 for a retrain on train + validation
            ("node", pa.string()),
            ("device", pa.string()),
            ("channels_last", pa.bool_()),  # the memory format auto chose (always on a GPU)
            ("precision_rates", pa.string()),  # what auto measured: "fp32 812, bf16 640, ... img/s"; null if explicit
            ("wall_s", pa.float64()),
        ]
    ),
    "epochs": pa.schema(
        [("trial_id", pa.string()), *((name, _ARROW_TYPES[kind]) for name, (kind, _) in EPOCH_COLUMNS.items())]
    ),
    "layers": pa.schema(
        [
            ("trial_id", pa.string()),
            ("epoch", pa.int64()),
            ("layer", pa.string()),  # parameter name, e.g. features.conv1.weight
            ("layer_index", pa.int64()),  # position in the forward order (model.named_parameters), from 0
            ("kind", pa.string()),  # weight (conv kernel or linear matrix), bias, or norm (BN scale/shift)
            ("numel", pa.int64()),
            ("grad_mean_abs", pa.float64()),  # mean |g| over elements, averaged over the epoch's steps
            ("grad_max_abs", pa.float64()),
            ("grad_l2", pa.float64()),
            ("weight_l2", pa.float64()),  # ||W_e||
            ("update_l2", pa.float64()),  # ||W_e - W_{e-1}||
            ("update_ratio", pa.float64()),  # update_l2 / weight_l2
            ("health", pa.string()),  # ok, vanishing (weight tensors only), exploding (any tensor)
        ]
    ),
    "steps": pa.schema(
        [
            ("trial_id", pa.string()),
            ("step", pa.int64()),  # global optimizer step, 1-based
            ("epoch", pa.int64()),
            ("train_loss", pa.float64()),
            ("lr", pa.float64()),
            # landscape probe (null on steps without one): along the current gradient direction
            ("probe_loss_min", pa.float64()),
            ("probe_loss_max", pa.float64()),
            ("probe_grad_change", pa.float64()),  # max ||g(x - s g) - g(x)|| over step sizes s
            ("probe_beta", pa.float64()),  # max ||g(x - s g) - g(x)|| / ||s g||
        ]
    ),
}
# Tables whose integer and boolean columns can be null: a `trials` row is written when the trial
# starts (no results yet), and an inactive hyperparameter is null. The other tables' integers
# (epoch, step, layer_index, numel) are always set, so they stay numpy int64.
NULLABLE_TABLES = ("trials",)
_PANDAS_TYPES = {"string": ("unicode", "object"), "double": ("float64", "float64")}
_NULLABLE_PANDAS_TYPES = {"int64": ("int64", "Int64"), "bool": ("bool", "boolean")}
_NUMPY_PANDAS_TYPES = {"int64": ("int64", "int64"), "bool": ("bool", "bool")}


def _with_pandas_dtypes(name: str, schema: pa.Schema) -> pa.Schema:
    """``schema`` carrying pandas metadata, so that a plain ``pandas.read_parquet(folder)`` gives
    nullable ``Int64`` / ``boolean`` columns where a null can occur.

    Without it pandas picks a column's dtype from the data it happens to read: an integer column
    with a null becomes float64 (``step_size`` 30 → 30.0), a boolean one object, and the same
    column changes dtype from one study to the next. pyarrow restores pandas extension dtypes
    from the ``numpy_type`` of the schema's ``pandas`` metadata (the layout pyarrow itself writes).
    """
    types = {**_PANDAS_TYPES, **(_NULLABLE_PANDAS_TYPES if name in NULLABLE_TABLES else _NUMPY_PANDAS_TYPES)}
    columns = []
    for column in schema:
        pandas_type, numpy_type = types[str(column.type)]
        field_type = {"pandas_type": pandas_type, "numpy_type": numpy_type, "metadata": None}
        columns.append({"name": column.name, "field_name": column.name, **field_type})
    metadata = {"index_columns": [], "column_indexes": [], "columns": columns, "pandas_version": pd.__version__}
    return schema.with_metadata({b"pandas": json.dumps(metadata).encode()})


SCHEMAS = {name: _with_pandas_dtypes(name, schema) for name, schema in SCHEMAS.items()}
TABLES = tuple(SCHEMAS)
PER_EPOCH_KEYS = {"epochs": ("epoch",), "layers": ("epoch", "layer"), "steps": ("step",)}


def to_arrow(name: str, rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts) to a table of the named schema; missing columns are null, extra keys an error."""
    schema = SCHEMAS[name]
    extra = set().union(*rows) - set(schema.names) if rows else set()
    if extra:
        raise ValueError(f"{name}: columns not in the schema: {sorted(extra)}")
    columns = {column: [row.get(column) for row in rows] for column in schema.names}
    return pa.table(columns, schema=schema)


def write_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` so that readers see the old file or the new one, never half.

    The temporary file is flushed to disk before the rename: after a power loss the name points
    at complete data, not at a file the rename outran.
    """
    _replace_durably(path, lambda temp: pq.write_table(table, temp))


def write_atomic_text(path: Path, text: str) -> None:
    """``path.write_text(text)``, atomic and durable like :func:`write_atomic`."""
    _replace_durably(path, lambda temp: temp.write_text(text))


def write_atomic_bytes(path: Path, data: bytes) -> None:
    """``path.write_bytes(data)``, atomic and durable like :func:`write_atomic` (a full disk raises
    OSError and leaves the old file, or none)."""
    _replace_durably(path, lambda temp: temp.write_bytes(data))


def _replace_durably(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(temp)
        with open(temp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


@dataclass
class TrialRecord:
    """Everything one trial has reported, deduplicated by epoch, ready to rewrite its part files."""

    trial_id: str
    trial: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = field(
        default_factory=lambda: {name: {} for name in PER_EPOCH_KEYS}
    )

    def add(self, name: str, new_rows: list[dict[str, Any]]) -> None:
        """Add rows of a per-epoch table; a row with the same key (a retried epoch) replaces the old one."""
        for row in new_rows:
            row = {**row, "trial_id": self.trial_id}
            self.rows[name][tuple(row[key] for key in PER_EPOCH_KEYS[name])] = row

    def drop_after(self, epoch: int) -> None:
        """Forget rows of epochs after ``epoch``: a trial restored from an older checkpoint redoes them."""
        for rows in self.rows.values():
            for key in [key for key, row in rows.items() if row["epoch"] > epoch]:
                del rows[key]

    def write(self, root: Path) -> None:
        folder = StudyFolder(root)
        summary = to_arrow("trials", [{**self.trial, "trial_id": self.trial_id}])
        write_atomic(summary, folder.part("trials", self.trial_id))
        for name, rows in self.rows.items():
            if rows or name != "steps":
                ordered = [rows[key] for key in sorted(rows)]
                write_atomic(to_arrow(name, ordered), folder.part(name, self.trial_id))

    @classmethod
    def load(cls, root: Path, trial_id: str) -> TrialRecord:
        """Read back what an earlier driver wrote for this trial (for ``--resume``); empty if nothing."""
        record = cls(trial_id)
        folder = StudyFolder(root)
        trials_part = folder.part("trials", trial_id)
        if trials_part.exists():
            record.trial = pq.read_table(trials_part).to_pylist()[0]
        for name in PER_EPOCH_KEYS:
            part = folder.part(name, trial_id)
            if part.exists():
                record.add(name, pq.read_table(part).to_pylist())
        return record


def finished_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """The finished trials with a validation result, best first: the one definition of "best".

    Ties go to the trial that needed fewer epochs, then to the smaller id, so the order is stable.
    """
    done = trials[trials["status"].isin(FINISHED_STATUSES) & trials["best_val_acc"].notna()]
    return done.sort_values(["best_val_acc", "epochs_run", "trial_id"], ascending=[False, True, True])


def ran_every_epoch(trials: pd.DataFrame) -> pd.Series:
    """Which rows of a ``trials`` table are COMPLETED trials (not stopped, diverged, failed or running)."""
    outcomes = [
        Outcome.of_row(s, None if pd.isna(r) else r)
        for s, r in zip(trials["status"], trials["stop_reason"], strict=True)
    ]
    return pd.Series([o is Outcome.COMPLETED for o in outcomes], index=trials.index, dtype=bool)


def outcome_counts(trials: pd.DataFrame) -> dict[Outcome, int]:
    """How many trials of a ``trials`` table, read once its driver has stopped, ended each way: a
    trial still RUNNING there is INTERRUPTED."""
    counts: dict[Outcome, int] = {}
    for status, reason in zip(trials["status"], trials["stop_reason"], strict=True):
        ended = Outcome.of_row(status, None if pd.isna(reason) else reason)
        ended = Outcome.INTERRUPTED if ended is Outcome.RUNNING else ended
        counts[ended] = counts.get(ended, 0) + 1
    return counts


def read_table(folder: str | Path, name: str) -> pd.DataFrame:
    """Read one table of a results folder, with a one-line error when it is not there."""
    path = StudyFolder(folder).table(name)
    if name not in SCHEMAS:
        raise UsageError(f"unknown table {name!r} (tables: {', '.join(TABLES)})")
    if not StudyFolder(folder).has_table(name):
        raise UsageError(
            f"{folder}: no {name} table (expected {path}/part-*.parquet); is this a tune-cifar results folder?"
        )
    try:
        return pd.read_parquet(path, schema=SCHEMAS[name])
    except (pa.ArrowException, OSError):
        damaged = damaged_parts(folder, (name,)) or [path]
        raise UsageError(
            f"{damaged[0]}: damaged Parquet file; `python -m tune_cifar.search --resume` rebuilds a study's "
            "tables from Ray's results (or move the file away)"
        ) from None


def damaged_parts(folder: str | Path, names: tuple[str, ...] = TABLES) -> list[Path]:
    """Part files of these tables that Parquet cannot read (truncated, overwritten, not Parquet)."""
    damaged = []
    for name in names:
        for part in StudyFolder(folder).parts(name):
            try:
                pq.read_table(part)
            except (pa.ArrowException, OSError):
                damaged.append(part)
    return damaged
