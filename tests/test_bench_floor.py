"""bench/data_floor.py times the data steps' own writers and readers: a small run keeps it working as they change."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from conftest import REPO


def test_data_floor_runs_the_steps_own_io_and_adds_up(tmp_path):
    out = tmp_path / "floor.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "data_floor.py"), "--rows", "3000", "--repeat", "1",
                           "--cores", "2", "--work", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    parts = r["codec_cpu_s"]
    assert list(parts) == ["raw read", "ingest write", "hash reads", "ids write"]
    assert all(s > 0 for s in parts.values()), parts
    assert r["floor_s"] == pytest.approx(r["startup"]["wall_s"] + sum(parts.values()) / 2)
    assert r["rest_cpu_s"] == pytest.approx(r["steps"]["cpu_s"] - r["startup"]["cpu_s"] - sum(parts.values()))
    assert r["rest_budget_cpu_s"] == pytest.approx((3000 / 500_000 - r["floor_s"]) * 2)
    # The steps really ran on the 3,000-row file: their output holds every row, and the id writer's scratch
    # files are gone.
    hashed = tmp_path / "work" / "criteo_3000.hashed"
    assert sum(pq.read_metadata(p).num_rows for p in hashed.glob("*/*.parquet")) == 3000
    assert not (tmp_path / "work" / "codec").exists()
    assert "| **floor**" in proc.stdout
