"""The README is the user's manual: every table column it promises is documented with its type."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tune_cifar import config as cfg
from tune_cifar.tables import SCHEMAS

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
        assert documented[field.name] == ARROW_NAMES[str(field.type)], f"{table}.{field.name}"
