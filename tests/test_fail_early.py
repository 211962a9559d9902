"""Data that cannot train fails at the start with the reason, not after an epoch (issue 18, item 8)."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from conftest import write_hashed_dataset
from deeplight.cli.main import main
from deeplight.data.synth import synthesize


def test_one_class_labels_fail_before_training(tmp_path: Path, capsys):
    data = write_hashed_dataset(tmp_path / "hashed", rows=20_000)
    part = data / "train" / "part-00000.parquet"
    table = pq.read_table(part)
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label",
                                    pa.array([0.0] * table.num_rows, pa.float32())), part)
    start = time.monotonic()
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "m"), "--no-mlflow", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "the train split has only label 0" in err and "AUC needs both classes" in err
    assert not (tmp_path / "m" / "last.pt").exists()  # nothing trained
    assert time.monotonic() - start < 30


def test_vocabulary_on_an_empty_train_split_is_refused(tmp_path: Path, capsys):
    raw = tmp_path / "raw.txt"
    synthesize("criteo", rows=200, seed=0, out=str(raw))
    assert main(["ingest", "--input", str(raw), "--out", str(tmp_path / "ing"), "--split", "0,0.5,0.5"]) == 0
    capsys.readouterr()
    assert main(["hash", "--input", str(tmp_path / "ing"), "--out", str(tmp_path / "h"), "--min-count", "2"]) == 2
    assert "the train split is empty" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()
    # Stable hashing needs no fitting: it still works on the same data.
    assert main(["hash", "--input", str(tmp_path / "ing"), "--out", str(tmp_path / "h"), "--buckets", "100"]) == 0
