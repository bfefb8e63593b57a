"""The README is the user's manual: every table column it promises is documented with its type,
the Arrow type of the schema and the pandas dtype ``pandas.read_parquet`` really gives."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from tune_cifar import config as cfg
from tune_cifar.tables import SCHEMAS, to_arrow, write_atomic

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
ARROW_NAMES = {"string": "string", "int64": "int64", "double": "double", "bool": "bool"}


def schema_rows(table: str) -> dict[str, str]:
    """``column -> type`` from the README's ``**`TABLE`**`` schema table (a row may name several columns)."""
    section = README.split(f"**`{table}`**", 1)[1].split("\n\n", 2)[1]
    rows = {}
    for line in section.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        names = re.findall(r"`([a-z_0-9]+)`", cells[0])
        types = [t.strip() for t in cells[1].split(",")]
        for i, name in enumerate(names):
            rows[name] = types[min(i, len(types) - 1)]
    return rows


@pytest.mark.parametrize("table", list(SCHEMAS))
def test_every_column_is_in_the_readme_schema_with_its_type(table: str) -> None:
    documented = schema_rows(table)
    for field in SCHEMAS[table]:
        if table == "trials" and field.name in cfg.KEYS:
            rows = [line for line in README.splitlines() if line.startswith("| `") and f"`{field.name}`" in line]
            assert rows, f"vocabulary key {field.name} missing from section 3"
            continue
        assert field.name in documented, f"{table}.{field.name} is not in the README's schema"
        arrow, _, _ = documented[field.name].partition(" (")
        assert arrow == ARROW_NAMES[str(field.type)], f"{table}.{field.name}"


def read_back_dtypes(table: str, folder: Path) -> dict[str, str]:
    """Write one row of the table (every column set) and read it as a user does: plain ``read_parquet``."""
    values = {"string": "x", "int64": 1, "double": 1.0, "bool": True}
    row = {field.name: values[str(field.type)] for field in SCHEMAS[table]}
    write_atomic(to_arrow(table, [row]), folder / table / "part-x.parquet")
    frame = pd.read_parquet(folder / table)
    # pandas 2 reads strings as object, pandas 3 as str; the README names pandas 3's
    return {name: "str" if str(dtype) == "object" else str(dtype) for name, dtype in frame.dtypes.items()}


@pytest.mark.parametrize("table", list(SCHEMAS))
def test_every_column_states_the_pandas_dtype_read_parquet_gives(table: str, tmp_path: Path) -> None:
    documented = schema_rows(table)
    dtypes = read_back_dtypes(table, tmp_path)
    section = README.split(f"**`{table}`**", 1)[1].split("\n\n", 2)[1]
    vocabulary_row = "".join(line for line in section.splitlines() if "as the key" in line)
    for field in SCHEMAS[table]:
        if table == "trials" and field.name in cfg.KEYS:  # one row for all of them: "int64 (Int64) / ..."
            assert f"{ARROW_NAMES[str(field.type)]} ({dtypes[field.name]})" in vocabulary_row, field.name
            continue
        match = re.fullmatch(r"\w+ \((\w+)\)", documented[field.name])
        assert match, f"{table}.{field.name}: type {documented[field.name]!r} does not state its pandas dtype"
        assert match[1] == dtypes[field.name], f"{table}.{field.name}"
