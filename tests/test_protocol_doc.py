"""docs/protocol.md against the code (mesh/protocol.py): the command table, the version and the error codes."""

from __future__ import annotations

import re
from pathlib import Path

from velesio.mesh.protocol import ERROR_CODES, MESH_ERROR_CODES, VERSION, Command

DOC = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text(encoding="utf-8")


def _section(heading: str) -> str:
    """The text under ``heading`` (a whole line) up to the next heading."""
    start = DOC.index(f"\n{heading}\n") + len(heading) + 2
    end = re.compile(r"^#{1,6} ", re.M).search(DOC, start)
    return DOC[start:end.start() if end else len(DOC)]


def _table_rows(text: str) -> list[list[str]]:
    """The body rows of the first Markdown table in ``text``, as stripped cells."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert len(rows) > 2, "no table"
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def test_command_table_is_the_code():
    rows = _table_rows(_section("## Frames"))
    assert {row[0]: int(row[1]) for row in rows} == {c.name: c.value for c in Command}
    assert [row[0] for row in rows] == [c.name for c in Command]  # in the code's order, each once


def test_version_is_the_code():
    stated = re.findall(r"\(version (\d+\.\d+)\)", DOC)
    assert stated == [VERSION]
    assert re.search(r"^# .*\(VMP/(\d+)\)$", DOC, re.M).group(1) == VERSION.split(".")[0]  # type: ignore[union-attr]
    assert re.search(r'"version": "(\d+\.\d+)"', DOC).group(1) == VERSION  # type: ignore[union-attr]


def test_error_codes_are_the_code():
    rows = _table_rows(_section("### Error codes"))
    listed = [row[0].strip("`") for row in rows]
    assert len(listed) == len(set(listed))
    assert set(listed) == set(ERROR_CODES) | set(MESH_ERROR_CODES)
    assert not set(ERROR_CODES) & set(MESH_ERROR_CODES)
    # A code a backend may raise says so in the table, and no other does.
    assert {row[0].strip("`") for row in rows if "backend" in row[1].split(", ")} == set(ERROR_CODES)
