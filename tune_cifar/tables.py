"""The Parquet tables every run and study leaves behind, and their atomic writer.

A results folder holds one directory per table (``trials``, ``epochs``, ``layers``, ``steps``),
each a Parquet dataset of part files, so ``pandas.read_parquet(folder / NAME)`` reads the whole
table. A finished run or study has one part file per trial and table; while it runs, each epoch a
trial reports is a file of its own, written once (:class:`TrialRecord` says why). Every file is
written to a temporary name and renamed, which gives the guarantees the study needs:

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
from typing import IO, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tune_cifar import config as cfg
from tune_cifar import helper_process
from tune_cifar.errors import UsageError
from tune_cifar.outcome import FINISHED_STATUSES, Outcome
from tune_cifar.report import EPOCH_COLUMNS
from tune_cifar.study_folder import StudyFolder, part_epoch, part_trial

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


@dataclass(frozen=True)
class Write:
    """One step of writing a trial's rows: ``rows`` into ``path`` (a new file, or one replaced
    whole), ``path`` removed (``rows`` None), or with ``keep_epochs`` the merged file rewritten
    with only those epochs' rows (read back from itself: the driver does not keep them)."""

    path: Path  # relative to the results folder
    table: str
    rows: list[dict[str, Any]] | None = None
    keep_epochs: frozenset[int] | None = None


@dataclass
class TrialRecord:
    """One trial's rows on their way to disk, deduplicated by epoch: what the driver keeps per trial.

    While a trial runs, each epoch's rows of ``epochs``, ``layers`` and ``steps`` go to part files of
    their own (``part-ID.eNNNNN.parquet``), each written once: a report costs the same at epoch 100
    as at epoch 1 (rewriting a trial's whole history on every report made it grow with the trial),
    the driver holds only the rows not yet written (not every trial's history), and a reader never
    meets a file being replaced (pyarrow may open a file twice while reading it). A retried epoch
    replaces its files; the epochs a restore redoes lose theirs. When the run or the study ends,
    :meth:`compact` merges a trial's epochs into its one file (``part-ID.parquet``), so a finished
    folder holds one file per trial and table. The ``trials`` row is one small file, replaced on
    every report.

    Every (trial, epoch) row lives in exactly one file, except for the moment a merge or a retry
    moves it: :func:`read_table` keeps one copy.
    """

    trial_id: str
    trial: dict[str, Any] = field(default_factory=dict)
    pending: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = field(
        default_factory=lambda: {name: {} for name in PER_EPOCH_KEYS}
    )  # rows of the epochs in ``dirty``, by key: a row with the same key replaces the earlier one
    written: set[int] = field(default_factory=set)  # epochs with part files of their own
    merged: set[int] = field(default_factory=set)  # epochs in the trial's merged part files
    dirty: set[int] = field(default_factory=set)  # epochs whose rows changed since the last write
    dropped: set[int] = field(default_factory=set)  # epochs whose own part files are to go
    merged_stale: bool = False  # the merged files hold epochs that moved out or went
    row_written: bool = False  # the trial's ``trials`` file exists

    def add(self, name: str, new_rows: list[dict[str, Any]]) -> None:
        """Add rows of a per-epoch table; a row with the same key (a retried epoch) replaces the old one."""
        for row in new_rows:
            row = {**row, "trial_id": self.trial_id}
            self.pending[name][tuple(row[key] for key in PER_EPOCH_KEYS[name])] = row
            epoch = row["epoch"]
            self.dirty.add(epoch)  # a retried epoch's files are written anew, with only the rows it reports now
            self.dropped.discard(epoch)
            if epoch in self.merged:  # the retried epoch leaves the merged files for files of its own
                self.merged.discard(epoch)
                self.merged_stale = True

    def drop_after(self, epoch: int) -> None:
        """Forget rows of epochs after ``epoch``: a trial restored from an older checkpoint redoes them."""
        for rows in self.pending.values():
            for key in [key for key, row in rows.items() if row["epoch"] > epoch]:
                del rows[key]
        self.dirty = {e for e in self.dirty if e <= epoch}
        self.dropped |= {e for e in self.written if e > epoch}
        if any(e > epoch for e in self.merged):
            self.merged = {e for e in self.merged if e <= epoch}
            self.merged_stale = True

    def changes(self) -> list[Write]:
        """What :meth:`write` would do, taken out of the record, in order (a row that moves is
        written before it is removed). The driver's writer thread takes them under a lock and
        has its helper process write them (:func:`serve_writes`)."""
        folder = StudyFolder(Path())
        trial_row = Write(folder.part("trials", self.trial_id), "trials", [{**self.trial, "trial_id": self.trial_id}])
        # A new trial's row comes first: a trial with no ``trials`` file has no other files either,
        # which lets :meth:`load` skip listing the folders for a trial new to the driver. Later
        # rows come last, after the epochs they count (a reader never sees epochs_run ahead of
        # the epochs table).
        writes = [] if self.row_written else [trial_row]
        for epoch in sorted(self.dirty):
            for name in PER_EPOCH_KEYS:
                rows = [row for key, row in sorted(self.pending[name].items()) if row["epoch"] == epoch]
                if rows or epoch in self.written:  # a retried epoch without rows of a table loses its file
                    writes.append(Write(folder.part(name, self.trial_id, epoch), name, rows or None))
        if self.merged_stale:
            keep = frozenset(self.merged)
            writes += [Write(folder.part(name, self.trial_id), name, keep_epochs=keep) for name in PER_EPOCH_KEYS]
        for epoch in sorted(self.dropped):
            writes += [Write(folder.part(name, self.trial_id, epoch), name) for name in PER_EPOCH_KEYS]
        self.written = (self.written | self.dirty) - self.dropped
        self.pending = {name: {} for name in PER_EPOCH_KEYS}
        self.dirty, self.dropped, self.merged_stale = set(), set(), False
        if self.row_written:
            return [*writes, trial_row]
        self.row_written = True
        return writes

    def write(self, root: Path) -> None:
        """Write what changed since the last write: the epochs reported since, and the trial's row."""
        apply(root, self.changes())

    def compact(self, root: Path) -> None:
        """Merge the trial's per-epoch part files into its one file per table, then remove them."""
        self.write(root)
        folder = StudyFolder(root)
        for name in PER_EPOCH_KEYS:
            epoch_files = [folder.part(name, self.trial_id, epoch) for epoch in sorted(self.written)]
            rows = _rows_of(name, [folder.part(name, self.trial_id), *epoch_files])
            if rows or name != "steps":  # a finished trial has epochs and layers files even without a report
                write_atomic(to_arrow(name, rows), folder.part(name, self.trial_id))
            for part in epoch_files:
                part.unlink(missing_ok=True)
        self.merged |= self.written
        self.written = set()

    @classmethod
    def load(cls, root: Path, trial_id: str, parts: dict[str, list[Path]] | None = None) -> TrialRecord:
        """Where an earlier driver left this trial (for ``--resume``): its row, and which epochs are
        on disk in which files (not the rows themselves). ``parts``: the trial's part files by table,
        when the caller has listed the folders already; else a trial without a ``trials`` file is
        new (:meth:`changes` writes it first) and one with it has its folders listed. An epoch
        both in the merged file and in a file of its own (a merge the driver did not finish)
        counts as the latter, and the next write leaves it there alone."""
        record = cls(trial_id)
        folder = StudyFolder(root)
        trials_part = folder.part("trials", trial_id)
        if not trials_part.exists() and parts is None:
            return record
        if trials_part.exists():
            record.trial = pq.read_table(trials_part).to_pylist()[0]
            record.row_written = True
        if parts is None:
            parts = {name: folder.parts(name, trial_id) for name in PER_EPOCH_KEYS}
        for name in PER_EPOCH_KEYS:
            for part in parts.get(name, []):
                epoch = part_epoch(part)
                if epoch is not None:
                    record.written.add(epoch)
                    continue
                record.merged |= set(pq.read_table(part, columns=["epoch"]).column("epoch").to_pylist())
        if record.merged & record.written:
            record.merged -= record.written
            record.merged_stale = True
        return record


def trial_rows(root: Path, name: str, trial_id: str) -> list[dict[str, Any]]:
    """One trial's rows of a per-epoch table as they are on disk, each key once (a file of the
    row's epoch wins over the merged file: it is the newer), in key order."""
    return _rows_of(name, StudyFolder(root).parts(name, trial_id))


def _rows_of(name: str, parts: list[Path]) -> list[dict[str, Any]]:
    """The rows of one trial's part files of a table, each key once, a per-epoch file's winning
    over the merged file's; a file that is not there (never written, or removed since it was
    listed: a retry dropped its epoch) has none."""
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for part in sorted(parts, key=lambda part: part_epoch(part) is not None):  # the merged file first
        try:
            table = pq.read_table(part)
        except FileNotFoundError:
            continue
        for row in table.to_pylist():
            rows[tuple(row[key] for key in PER_EPOCH_KEYS[name])] = row
    return [rows[key] for key in sorted(rows)]


def apply(root: Path, writes: list[Write]) -> None:
    """Carry out :meth:`TrialRecord.changes` under the results folder ``root``, in order."""
    for write in writes:
        path = root / write.path
        if write.keep_epochs is not None:
            if path.exists():
                kept = [row for row in pq.read_table(path).to_pylist() if row["epoch"] in write.keep_epochs]
                write_atomic(to_arrow(write.table, kept), path)
        elif write.rows is None:
            path.unlink(missing_ok=True)
        else:
            write_atomic(to_arrow(write.table, write.rows), path)


def serve_writes(jobs: IO[bytes], replies: IO[bytes]) -> None:
    """The driver's Parquet writer process (:class:`~tune_cifar.helper_process.HelperProcess`):
    :func:`apply` each ``(root, writes)`` job in order, replying None, or the exception it raised
    (a full disk's OSError stops the study; anything else is a bug, raised in the driver)."""
    while (job := helper_process.receive(jobs)) is not None:
        root, writes = job
        try:
            apply(root, writes)
        except Exception as exc:
            helper_process.reply(replies, exc)
        else:
            helper_process.reply(replies, None)


def compact(folder: str | Path, records: dict[str, TrialRecord] | None = None) -> list[str]:
    """Merge the per-epoch part files into one file per trial and table, what a finished run or
    study holds: of each trial in ``records`` (the driver's own, which know their files), and of
    every other trial with per-epoch files on disk (left by a driver that died). Each table's
    folder is listed once, not once per trial. Returns the trials merged."""
    root = Path(folder)
    records = records or {}
    listed: dict[str, dict[str, list[Path]]] = {}
    for name in PER_EPOCH_KEYS:
        for part in StudyFolder(root).parts(name):
            listed.setdefault(part_trial(part), {}).setdefault(name, []).append(part)
    unmerged = {
        trial_id
        for trial_id, parts in listed.items()
        if any(part_epoch(part) is not None for table_parts in parts.values() for part in table_parts)
    }
    merged = sorted(unmerged | set(records))
    for trial_id in merged:
        parts = listed.get(trial_id, {})
        record = records.get(trial_id) or TrialRecord.load(root, trial_id, parts)
        # epoch files the record does not know (left by an older driver, or beside a trials file
        # set aside as damaged) are merged too, or they would shadow the merged rows
        epochs = (part_epoch(part) for files in parts.values() for part in files)
        record.written |= {epoch for epoch in epochs if epoch is not None}
        record.compact(root)
    return merged


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
        frame = pd.read_parquet(path, schema=SCHEMAS[name])
    except (pa.ArrowException, OSError):
        damaged = damaged_parts(folder, (name,)) or [path]
        raise UsageError(
            f"{damaged[0]}: damaged Parquet file; `python -m tune_cifar.search --resume` rebuilds a study's "
            "tables from Ray's results (or move the file away)"
        ) from None
    if name in PER_EPOCH_KEYS and any(part_epoch(part) is not None for part in StudyFolder(folder).parts(name)):
        # a study running (or stopped without merging): a row being moved can be in two files for a
        # moment; they sort epoch file first, its copy is the newer one
        frame = frame.drop_duplicates(["trial_id", *PER_EPOCH_KEYS[name]], keep="first", ignore_index=True)
    return frame


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
