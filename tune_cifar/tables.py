"""The Parquet tables every run and study leaves behind, and their atomic writer.

A results folder holds one directory per table (``trials``, ``epochs``, ``layers``, ``steps``),
each a Parquet dataset of part files, so ``pandas.read_parquet(folder / NAME)`` reads the whole
table. A finished run or study has one part file per trial and table; while it runs, the rows
arrive in round files and a live file (:class:`TableWriter` says why). Every file is written to
a temporary name and renamed, which gives the guarantees the study needs:

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
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tune_cifar import config as cfg
from tune_cifar import helper_process
from tune_cifar.errors import UsageError
from tune_cifar.outcome import FINISHED_STATUSES, Outcome
from tune_cifar.report import EPOCH_COLUMNS
from tune_cifar.study_folder import StudyFolder, part_trial

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
    """One step of a writer round: ``rows`` into ``path`` (a new file, or one replaced whole), or
    the rows of ``drop``'s ``(trial_id, epoch)`` keys taken out of ``path`` (read back from the file
    itself: the driver keeps no rows once they are written; the file goes when none is left)."""

    path: Path  # relative to the results folder
    table: str
    rows: list[dict[str, Any]] | None = None
    drop: frozenset[tuple[str, int]] | None = None


LIVE, OWN = "live", "own"  # where a trial's ``trials`` row is: the study's live file, or a file of its own


Part = tuple[str, int]  # (table, epoch): one table's rows of one epoch of a trial, kept in one file


@dataclass
class TrialRecord:
    """One trial's rows on their way to disk, deduplicated by epoch, and which file holds each
    table's rows of each earlier epoch: what the driver keeps per trial (:class:`TableWriter`
    says where the files are). Each table's copy is tracked on its own: a driver killed between
    a round's files, or in the middle of removing the merged rounds, leaves one table's rows of an
    epoch where another's are not."""

    trial_id: str
    trial: dict[str, Any] = field(default_factory=dict)  # the trial's ``trials`` row: replace it, don't edit it
    pending: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = field(
        default_factory=lambda: {name: {} for name in PER_EPOCH_KEYS}
    )  # rows of the epochs in ``dirty``, by key: a row with the same key replaces the earlier one
    dirty: set[int] = field(default_factory=set)  # epochs reported since the last round
    rounds: dict[Part, int] = field(default_factory=dict)  # -> the round file holding those rows
    merged: set[Part] = field(default_factory=set)  # in the trial's merged files
    leaving: dict[int, set[Part]] = field(default_factory=dict)  # round -> rows that are to leave its files
    unmerged: set[Part] = field(default_factory=set)  # rows that are to leave the merged files
    row_in: str | None = None  # LIVE, OWN, or None: the row was never written
    written_row: dict[str, Any] | None = None  # the ``trial`` last written (the same object until replaced)

    def add(self, name: str, new_rows: list[dict[str, Any]]) -> None:
        """Add rows of a per-epoch table; a row with the same key (a retried epoch) replaces the old one."""
        for row in new_rows:
            row = {**row, "trial_id": self.trial_id}
            self.pending[name][row_key(name, row)] = row
            epoch = row["epoch"]
            self.dirty.add(epoch)  # a retried epoch is written anew, every table with only the rows it reports now
            for table in PER_EPOCH_KEYS:
                self._leave((table, epoch))

    def drop_after(self, epoch: int) -> None:
        """Forget rows of epochs after ``epoch``: a trial restored from an older checkpoint redoes them."""
        for rows in self.pending.values():
            for key in [key for key, row in rows.items() if row["epoch"] > epoch]:
                del rows[key]
        self.dirty = {e for e in self.dirty if e <= epoch}
        for part in [part for part in (*self.rounds, *self.merged) if part[1] > epoch]:
            self._leave(part)

    def _leave(self, part: Part) -> None:
        """These rows on disk are to go (their replacement, if any, is written first)."""
        if part in self.rounds:
            self.leaving.setdefault(self.rounds.pop(part), set()).add(part)
        self._unmerge(part)

    def _unmerge(self, part: Part) -> None:
        if part in self.merged:
            self.merged.discard(part)
            self.unmerged.add(part)

    def found_in_round(self, part: Part, number: int) -> None:
        """An earlier driver left these rows in round file ``number``: the newest copy is the one."""
        older = self.rounds.get(part)
        if older is not None and older != number:
            self.leaving.setdefault(min(older, number), set()).add(part)
        self.rounds[part] = max(number, older or number)
        self._unmerge(part)  # also in the merged file: a merge the driver did not finish, the round's copy counts

    def row(self) -> dict[str, Any]:
        return {**self.trial, "trial_id": self.trial_id}


@dataclass
class TableWriter:
    """Every trial's rows of one results folder on their way to disk, written in rounds.

    The driver adds each report to its trial's :class:`TrialRecord`; a writer round
    (:meth:`changes`) then writes the rows of every epoch reported since the last round, of all
    trials together, as one file per table (``round-NNNNNNNN.parquet``): a report costs the same at
    epoch 100 as at epoch 1, a round costs a few files however many trials reported in it, and a
    reader seldom meets a round file being replaced (pyarrow may open a file twice while reading
    it): only when rows are taken out of it. A retried epoch's rows are written in the new round,
    then taken out of the older file; the epochs a restore redoes are taken out too. A running
    trial's ``trials`` row is in the study's live file (``trials/live.parquet``, every running
    trial's row, replaced each round, empty when none runs);
    a finished trial's row goes to a file of its own (``part-ID.parquet``). When the run or the
    study ends, :meth:`compact` merges each trial's epochs into its one file per table and moves
    the rows left live to their own files, so a finished folder holds one file per trial and table.

    Every row lives in exactly one file, except for the moment a merge, a retry or a finish
    moves it (new copy first; a driver killed in that moment leaves both until the next driver's
    first round): :func:`read_table` keeps the newer copy.
    """

    root: Path
    records: dict[str, TrialRecord] = field(default_factory=dict)
    next_round: int = 1
    on_disk: set[str] = field(default_factory=set)  # trials with files of their own when the writer opened
    live_changed: bool = False  # the live file must be written again

    @classmethod
    def open(cls, root: str | Path) -> TableWriter:
        """The writer of a results folder, knowing where earlier drivers left it (``--resume``):
        the rows of the live file, and which epochs are in which round file (not the rows)."""
        writer = cls(Path(root))
        folder = StudyFolder(writer.root)
        writer.on_disk = {part_trial(part) for name in TABLES for part in folder.parts(name)}
        live = folder.live_trials()
        if live.exists():
            writer.live_changed = True  # rewritten in the first round: without the rows that moved on
            for row in pq.read_table(live).to_pylist():
                record = writer.record(row["trial_id"])
                if record.row_in is None:  # a trial whose own file exists finished after this row
                    record.trial = record.written_row = row
                    record.row_in = LIVE
        for name in PER_EPOCH_KEYS:
            for path in folder.rounds(name):
                number = round_number(path)
                writer.next_round = max(writer.next_round, number + 1)
                keys = pq.read_table(path, columns=["trial_id", "epoch"]).to_pydict()
                for trial_id, epoch in set(zip(keys["trial_id"], keys["epoch"], strict=True)):
                    writer.record(trial_id).found_in_round((name, epoch), number)
        return writer

    def record(self, trial_id: str) -> TrialRecord:
        """A trial's record; for a trial an earlier driver wrote, its row and merged epochs from disk."""
        record = self.records.get(trial_id)
        if record is not None:
            return record
        record = self.records[trial_id] = TrialRecord(trial_id)
        if trial_id in self.on_disk:
            folder = StudyFolder(self.root)
            if folder.part("trials", trial_id).exists():
                record.trial = pq.read_table(folder.part("trials", trial_id)).to_pylist()[0]
                record.written_row, record.row_in = record.trial, OWN
            for name in PER_EPOCH_KEYS:
                if folder.part(name, trial_id).exists():
                    epochs = pq.read_table(folder.part(name, trial_id), columns=["epoch"]).column("epoch")
                    record.merged |= {(name, epoch) for epoch in epochs.to_pylist()}
        return record

    def changes(self) -> list[Write]:
        """One round: what changed since the last, taken out of the records, in order (a row that
        moves is written before it is removed; a ``trials`` row after the epochs it counts). The
        driver's writer thread takes them under a lock and has a helper process write them
        (:func:`serve_writes`)."""
        folder = StudyFolder(Path())
        records = [self.records[trial_id] for trial_id in sorted(self.records)]
        writes = []
        reported = [record for record in records if record.dirty]
        if reported:
            number, self.next_round = self.next_round, self.next_round + 1
            for name in PER_EPOCH_KEYS:
                rows = [row for record in reported for _, row in sorted(record.pending[name].items())]
                if rows:
                    writes.append(Write(folder.round_file(name, number), name, rows))
            for record in reported:
                record.rounds |= dict.fromkeys(((name, e) for name in PER_EPOCH_KEYS for e in record.dirty), number)
                record.pending = {name: {} for name in PER_EPOCH_KEYS}
                record.dirty = set()
        leaving: dict[tuple[Path, str], set[tuple[str, int]]] = {}
        for record in records:
            for number, parts in record.leaving.items():
                for name, epoch in parts:
                    leaving.setdefault((folder.round_file(name, number), name), set()).add((record.trial_id, epoch))
            for name, epoch in record.unmerged:
                leaving.setdefault((folder.part(name, record.trial_id), name), set()).add((record.trial_id, epoch))
            record.leaving, record.unmerged = {}, set()
        writes += [Write(path, name, drop=frozenset(keys)) for (path, name), keys in leaving.items()]
        for record in records:
            # a new row is a new dict: no comparing every trial's; a trial known only by its epochs
            # on disk (its row was never written) gets a row when the driver gives it one
            if record.trial is record.written_row or not record.trial:
                continue
            if record.row_in == OWN or record.trial.get("status") in FINISHED_STATUSES:
                writes.append(Write(folder.part("trials", record.trial_id), "trials", [record.row()]))
                self.live_changed |= record.row_in == LIVE
                record.row_in = OWN
            else:
                self.live_changed, record.row_in = True, LIVE
            record.written_row = record.trial
        if self.live_changed:  # after the own files: a finished trial's row is never missing
            # kept while the study runs, empty when no trial is running (a reader listing the
            # folder then finds the file it listed); the merge at the end removes it
            live = [record.row() for record in records if record.row_in == LIVE]
            writes.append(Write(folder.live_trials(), "trials", live))
            self.live_changed = False
        return writes

    def write(self) -> None:
        """One round, written here (a single run; the study's driver writes in a helper process)."""
        apply(self.root, self.changes())

    def compact(self, known: set[str] | None = None) -> list[str]:
        """Merge the round files into one file per trial and table and give every live row its
        trial's own file: what a finished run or study holds. Trials not in ``known`` (lost with
        an earlier driver) are left out: their rows go with the round files. Returns the trials
        whose epochs were merged. The rows stay Arrow columns throughout (a long study's rounds
        hold millions of ``steps`` rows)."""
        self.write()
        folder = StudyFolder(self.root)
        new_rows: dict[str, dict[str, pa.Table]] = {}  # table -> trial id -> its rows from the rounds
        for name in PER_EPOCH_KEYS:
            rounds = [pq.read_table(path, schema=SCHEMAS[name]) for path in folder.rounds(name)]  # in round order
            if rounds and known is not None:
                known_ids = pa.array(sorted(known), pa.string())
                rounds = [table.filter(pc.is_in(table["trial_id"], value_set=known_ids)) for table in rounds]
            new_rows[name] = _by_trial(latest_rows(name, rounds)) if rounds else {}
        kept = (lambda trial_id: True) if known is None else known.__contains__
        merged = sorted({t for rows in new_rows.values() for t in rows} | {t for t in self.records if kept(t)})
        for trial_id in merged:
            record = self.record(trial_id)
            for name in PER_EPOCH_KEYS:
                rows = new_rows[name].get(trial_id)
                path = folder.part(name, trial_id)
                if rows is None and path.exists():
                    continue
                if path.exists():
                    rows = latest_rows(name, [pq.read_table(path, schema=SCHEMAS[name]), rows])
                if rows is None and name != "steps":  # a finished trial has epochs and layers files, reported or not
                    rows = SCHEMAS[name].empty_table()
                if rows is not None:
                    write_atomic(rows, path)
            record.merged |= set(record.rounds)
            record.rounds = {}
            if record.row_in == LIVE:
                write_atomic(to_arrow("trials", [record.row()]), folder.part("trials", trial_id))
                record.row_in = OWN
        for name in PER_EPOCH_KEYS:
            for path in folder.rounds(name):
                path.unlink()
        folder.live_trials().unlink(missing_ok=True)
        return merged


def latest_rows(name: str, tables: list[pa.Table]) -> pa.Table:
    """The rows of ``tables`` (a per-epoch table's, oldest first), each key once: a later copy of a
    row replaces an earlier one (a retried or resumed epoch); sorted by trial and key."""
    keys = ["trial_id", *PER_EPOCH_KEYS[name]]
    table = pa.concat_tables(tables)
    numbered = table.append_column("_order", pa.array(range(table.num_rows), pa.int64()))
    last = numbered.group_by(keys, use_threads=False).aggregate([("_order", "max")])
    newest = table.filter(pc.is_in(numbered["_order"], value_set=last["_order_max"]))
    return newest.sort_by([(key, "ascending") for key in keys])


def _by_trial(table: pa.Table) -> dict[str, pa.Table]:
    """A table sorted by trial, cut into each trial's rows."""
    parts, offset = {}, 0
    for item in pc.value_counts(table["trial_id"]).to_pylist():  # in order of appearance: sorted
        parts[item["values"]] = table.slice(offset, item["counts"])
        offset += item["counts"]
    return parts


def round_number(path: Path) -> int:
    """The round a round file holds (``round-NNNNNNNN.parquet``)."""
    return int(path.name.removeprefix("round-").removesuffix(".parquet"))


def row_key(name: str, row: dict[str, Any]) -> tuple[Any, ...]:
    """A per-epoch table's row's key within its trial (a row with the same key replaces it)."""
    return tuple(row[key] for key in PER_EPOCH_KEYS[name])


def trial_rows(root: Path, name: str, trial_id: str) -> list[dict[str, Any]]:
    """One trial's rows of a per-epoch table as they are on disk, each key once (a round file's
    copy wins over the merged file's, a later round's over an earlier's: :func:`latest_rows`), in
    key order. Reads every round file: for a resumed trial, not on every report."""
    folder = StudyFolder(root)
    found = []
    for path in [folder.part(name, trial_id), *folder.rounds(name)]:
        try:
            found.append(pq.read_table(path, schema=SCHEMAS[name], filters=[("trial_id", "==", trial_id)]))
        except FileNotFoundError:  # never written, or merged since it was listed
            continue
    return latest_rows(name, found).to_pylist() if found else []


def apply(root: Path, writes: list[Write]) -> None:
    """Carry out :meth:`TableWriter.changes` under the results folder ``root``, in order."""
    for write in writes:
        path = root / write.path
        if write.drop is not None:
            if path.exists():
                rows = pq.read_table(path).to_pylist()
                kept = [row for row in rows if (row["trial_id"], row["epoch"]) not in write.drop]
                if not kept:
                    path.unlink()
                elif len(kept) < len(rows):
                    write_atomic(to_arrow(write.table, kept), path)
        else:
            write_atomic(to_arrow(write.table, write.rows or []), path)


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
    study = StudyFolder(Path(folder))
    path = study.table(name)
    if name not in SCHEMAS:
        raise UsageError(f"unknown table {name!r} (tables: {', '.join(TABLES)})")
    if not study.has_table(name):
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
    if len(study.files(name)) > len(study.parts(name)):
        # a study running (or stopped without merging): a row being moved can be in two files for a
        # moment; the files sort live, merged, rounds in order, so the last copy is the newer one
        keys = ["trial_id", *PER_EPOCH_KEYS.get(name, ())]
        frame = frame.drop_duplicates(keys, keep="last", ignore_index=True)
    return frame


def damaged_parts(folder: str | Path, names: tuple[str, ...] = TABLES) -> list[Path]:
    """Part files of these tables that Parquet cannot read (truncated, overwritten, not Parquet)."""
    damaged = []
    for name in names:
        for part in StudyFolder(folder).files(name):
            try:
                pq.read_table(part)
            except (pa.ArrowException, OSError):
                damaged.append(part)
    return damaged
