"""Output folders are replaced only when that loses nothing (issue 18, item 1): never an input or a folder
holding one, never a file, never a non-empty folder that is not a previous result of the same step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deeplight.base.files import OUTPUT_MARKER
from deeplight.cli.main import main
from deeplight.data.synth import synthesize


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    folder = tmp_path / "A" / "in"
    folder.mkdir(parents=True)
    synthesize("criteo", rows=300, seed=0, out=str(folder / "x.txt"))
    (folder / "notes.txt").write_text("keep me")
    return folder / "x.txt"


def ingest(raw: Path, out: Path | str) -> int:
    return main(["ingest", "--input", str(raw), "--out", str(out)])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_ingest_refuses_outputs_that_would_lose_data(raw: Path, tmp_path: Path, capsys, monkeypatch):
    before = snapshot(tmp_path)
    assert ingest(raw, raw.parent) == 2  # the folder holding the input
    assert "is or contains the input" in capsys.readouterr().err
    assert ingest(raw, raw) == 2  # the input file itself
    assert "is or contains the input" in capsys.readouterr().err
    assert ingest(raw, tmp_path / "A") == 2  # a folder further up
    monkeypatch.chdir(raw.parent)
    assert ingest(raw, ".") == 2
    capsys.readouterr()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    assert ingest(raw, other) == 2
    assert "not a previous `deeplight ingest` result" in capsys.readouterr().err
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    assert ingest(raw, notes) == 2
    assert "not a folder" in capsys.readouterr().err
    assert snapshot(tmp_path) == {**before, "mine/thesis.tex": b"years of work", "notes.txt": b"x"}


def test_a_previous_result_is_replaced_and_marked(raw: Path, tmp_path: Path, capsys):
    out = tmp_path / "ingested"
    assert ingest(raw, out) == 0
    assert json.loads((out / OUTPUT_MARKER).read_text()) == {"step": "ingest"}
    first = json.loads((out / "report.json").read_text())
    assert ingest(raw, out) == 0  # the same step's result: replaced
    assert json.loads((out / "report.json").read_text())["written"] == first["written"]
    (out / OUTPUT_MARKER).unlink()  # a result written before markers existed: known by its report.json
    assert ingest(raw, out) == 0 and (out / OUTPUT_MARKER).is_file()
    # Another step's result is not ingest's to replace, and hash never writes over its input.
    hashed = tmp_path / "hashed"
    assert main(["hash", "--input", str(out), "--out", str(hashed), "--min-count", "1"]) == 0
    assert json.loads((hashed / OUTPUT_MARKER).read_text()) == {"step": "hash"}
    capsys.readouterr()
    assert ingest(raw, hashed) == 2
    assert "not a previous `deeplight ingest` result" in capsys.readouterr().err
    assert main(["hash", "--input", str(out), "--out", str(out)]) == 2
    assert (out / "report.json").is_file()
