"""bench/serving.py builds two models, starts four servers and loads them: a tiny run keeps it working as serving
changes, and checks that its numbers add up and come from servers that really answered."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

SIZES = [1, 100, 1000]
PATHS = ["engine", "scorer", "pyfunc", "mlflow", "kserve-v1", "kserve-v2", "kserve-tsv"]
ENDPOINTS = ["mlflow", "kserve-v1", "kserve-v2", "kserve-tsv"]


def _alive_busy_loop(pid: int) -> bool:
    """True if `pid` is still one of the benchmark's busy loops (a reused PID is not)."""
    try:
        return "getppid" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
@pytest.mark.integration
def test_serving_bench_adds_up_and_servers_answered(tmp_path):
    out = tmp_path / "serving.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "serving.py"), "--quick", "--work",
                           str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["config"]["quick"] and r["config"]["sizes"] == SIZES

    # every cell is there, once, and its numbers are consistent
    cells = {(c["cond"], c["path"], c["model"], c["rows"], c["concurrency"]): c for c in r["cells"]}
    assert len(cells) == len(r["cells"])
    want = {(cond, path, model, rows, conc)
            for cond in ("quiet", "oversubscribed") for path in PATHS for model in ("dense", "pruned")
            for rows in SIZES for conc in ((1, 8) if path in ENDPOINTS else (1,))}
    assert set(cells) == want
    for key, c in cells.items():
        assert c["errors"] == 0, (key, c.get("first_error"))
        assert 1 <= c["ok"] == c["requests"] <= r["config"]["requests"], key
        assert 0 < c["p50_ms"] <= c["p99_ms"], key
        assert c["rows_per_s"] == pytest.approx(c["ok"] * key[3] / c["seconds"]), key
        # bounded: the budget (split over rounds) plus one call that started before it ran out
        assert c["seconds"] < r["config"]["seconds"] + 60, key

    # the servers answered every timed request (with the right number of predictions), plus the parity request
    for a in r["answered"]:
        timed = sum(c["ok"] for k, c in cells.items() if k[1] == a["endpoint"] and k[2] == a["model"])
        assert a["responses"] == timed + 1, a
    assert len(r["parity"]) == 8
    for p in r["parity"]:
        assert p["status"] == 200 and p["max_abs_diff"] is not None and p["max_abs_diff"] < 1e-6, p

    # malformed requests reached every server: 4 cases x 6 paths; a non-integer in I5 is refused everywhere
    assert len(r["malformed"]) == 24
    for m in r["malformed"]:
        if m["endpoint"] != "pyfunc":
            assert isinstance(m["status"], int) and m["status"] > 0, m
        if m["case"] == "non-integer in I5":
            assert not m["scored"] and m["names_row"] and m["names_field"], m

    # the goals are recorded; the busy loops and the servers are gone
    assert len(r["goals"]) == 2 + 4 * 7 + 6
    assert all(g["value"] is not None for g in r["goals"])
    o = r["oversubscription"]
    assert o["processes"] == 2 * r["machine"]["nproc"] - 1 and o["all_stopped"]
    assert not any(_alive_busy_loop(pid) for pid in o["pids"])
    assert len(r["servers"]) == 4 and all(s["stopped"] for s in r["servers"])
    assert not any(_accepts(s["port"]) for s in r["servers"])
    assert r["loadavg"]["by_phase"]["quiet"]["samples"] >= 1
    assert "| goal |" in proc.stdout and "| kserve-tsv | pruned | 1,000 | 8 |" in proc.stdout
