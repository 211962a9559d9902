"""Progress off a terminal: timed log lines (KFP's runner and cluster pods have no TTY, where tqdm shows nothing)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deeplight.base.progress import LogProgress, progress


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_log_lines_every_interval_and_at_the_end():
    clock, out = Clock(), io.StringIO()
    bar = LogProgress(total=3_000_000, desc="fit vocab", unit="rows", every=30, file=out, clock=clock)
    with bar:
        for _ in range(10):
            clock.t += 10
            bar.update(100_000)
            bar.set_postfix(loss="0.4521")
    lines = out.getvalue().splitlines()
    # updates at t = 110 .. 200: a line once 30 s have passed since the last one (130, 160, 190), then the last
    assert len(lines) == 4, lines
    assert lines[0] == "fit vocab: 300.00k/3.00M rows (10%), 10.00k rows/s, 30 s, eta 4m30s, loss=0.4521"
    assert lines[-1].startswith("fit vocab: 1.00M/3.00M rows (33%), 10.00k rows/s, 1m40s, eta 3m20s")


def test_unknown_total_and_resumed_counts():
    clock, out = Clock(), io.StringIO()
    bar = LogProgress(total=None, desc="ingest", unit="B", initial=500, every=0, file=out, clock=clock)
    clock.t += 2
    bar.update(1000)  # the rate counts what this run did, not the resumed start
    bar.close()
    bar.close()  # once only
    lines = out.getvalue().splitlines()
    assert lines == ["ingest: 1.50k B, 500 B/s, 2 s"] * 2


def test_progress_picks_log_lines_off_a_terminal(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("DEEPLIGHT_PROGRESS", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert isinstance(progress(total=10, desc="x"), LogProgress)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert not isinstance(progress(total=10, desc="x"), LogProgress)  # tqdm on a terminal
    monkeypatch.setenv("DEEPLIGHT_PROGRESS", "off")
    silent = progress(total=10, desc="x")
    assert isinstance(silent, LogProgress) and silent.silent


def test_a_data_step_run_off_a_terminal_logs_its_progress(tmp_path: Path):
    """`deeplight synth` with stderr to a pipe (as under KFP): progress lines, not nothing."""
    env = {**os.environ, "DEEPLIGHT_PROGRESS_SECONDS": "0"}
    env.pop("DEEPLIGHT_PROGRESS", None)
    proc = subprocess.run([sys.executable, "-m", "deeplight.cli", "synth", "--rows", "3000", "--out",
                           str(tmp_path / "raw.txt")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("synth criteo: ")]
    assert lines and lines[-1].startswith("synth criteo: 3.00k/3.00k rows (100%)"), proc.stderr


def test_run_local_step_log_keeps_everything_and_shows_steps_and_progress(tmp_path: Path):
    """`deeplight pipeline run-local` without --verbose: KFP's output to a file, the terminal a concise account."""
    from deeplight.cli.pipeline import StepLog

    clock, out = Clock(), io.StringIO()
    log = StepLog(tmp_path / "run.log", out, clock=clock)
    log.write("\x1b[1m12:00:01.000 - INFO - Executing task \x1b[96m'train'\x1b[0m\n12:00:01.1 - INFO - Streamed logs:\n")
    log.write("    {\"executor_input\": \"...\"}\n    epoch 1/2: 200.00k/300.00k samples (67%), 17.00k sample")
    clock.t += 75
    log.write("s/s, 12 s, eta 6 s, loss=0.4500\n")
    log.write("12:01:16.000 - INFO - Task 'train' finished with status \x1b[92mSUCCESS\x1b[0m\n")
    log.close()
    assert out.getvalue().splitlines() == [
        "train: started",
        "    epoch 1/2: 200.00k/300.00k samples (67%), 17.00k samples/s, 12 s, eta 6 s, loss=0.4500",
        "train: SUCCESS in 75 s"]
    assert "executor_input" in (tmp_path / "run.log").read_text()
