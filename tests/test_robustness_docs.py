"""docs/robustness.md: every case row names tests, and every test it names exists (so every row runs in CI)."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "robustness.md"
REF = re.compile(r"(?:(test_\w+\.py)::|::)(\w+)(\[[^\]]*\])?")


def _case_rows() -> list[tuple[str, str]]:
    """(section, last cell) of every table row of the case sections (not detectron2's own messages)."""
    rows, section = [], ""
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:]
        elif line.startswith("|") and not line.startswith("|---") and section != "Messages from detectron2 itself, and what to do":
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells[0] != "case":
                rows.append((section, cells[-1]))
    return rows


def test_every_case_row_names_tests_that_exist():
    rows = _case_rows()
    assert {s for s, _ in rows} == {
        "Checkpoints", "Images", "Tensors and precision", "Training", "Datasets", "Configs", "Files written"
    }
    assert len(rows) > 60
    for section, cell in rows:
        refs, current = [], None
        for m in REF.finditer(cell):
            current = m.group(1) or current
            assert current is not None, cell
            refs.append((current, m.group(2), m.group(3)))
        assert refs, f"{section}: a row without a test: {cell!r}"
        for file, name, param in refs:
            source = (REPO / "tests" / file).read_text()
            assert re.search(rf"^def {name}\(", source, re.M), f"{file}::{name} does not exist"
            if param and param != "[...]":
                assert param[1:-1] in source, f"{file}::{name}{param}: no such parameter"
