"""Output folders under concurrency, kills and umasks (issue 18, items 5, 6, 9).

- Concurrent writers of one output: exactly one wins, the others get a DeeplightError naming the output, and
  nothing (.tmp-, .old-, .lock) is left beside it. Real processes (fork), many repetitions.
- Replacing a result never leaves a moment without a complete output; a replacement killed between the two
  renames of the non-atomic fallback is undone by the next run.
- Temp folders of a run killed with SIGKILL are removed by the next run to the same output, and only those.
- Every file and folder the steps write has the umask's usual mode (0644/0755 under 022, 0600/0700 under 077).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from deeplight.base import files
from deeplight.base.errors import DeeplightError
from deeplight.base.files import atomic_output_dir
from deeplight.cli.main import main
from deeplight.data.synth import synthesize

FORK = multiprocessing.get_context("fork")


def beside(out: Path) -> list[str]:
    """Everything in the output's parent folder: the output and whatever a writer left next to it."""
    return sorted(p.name for p in out.parent.iterdir())


def _writer(out: str, who: int, reports: "multiprocessing.Queue", go: "multiprocessing.Event") -> None:
    try:
        with atomic_output_dir(out, step="race") as tmp:
            (tmp / "who").write_text(str(who))
            reports.put((who, "entered"))
            go.wait(60)  # hold the output until every other writer has tried
    except DeeplightError as e:
        reports.put((who, f"refused: {e}"))
    except BaseException as e:  # noqa: BLE001 - what the test must never see: a raw OSError
        reports.put((who, f"raw {type(e).__name__}: {e}"))


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "replacing"])
def test_concurrent_writers_one_wins_the_others_get_a_clear_error(tmp_path: Path, existing: bool):
    out = tmp_path / "out"
    if existing:
        with atomic_output_dir(out, step="race") as tmp:
            (tmp / "who").write_text("before")
    for rep in range(15):
        reports, go = FORK.Queue(), FORK.Event()
        procs = [FORK.Process(target=_writer, args=(str(out), i, reports, go)) for i in range(4)]
        for p in procs:
            p.start()
        got = dict(reports.get(timeout=60) for _ in procs)  # every writer entered or was refused
        go.set()
        for p in procs:
            p.join(60)
        winners = [i for i, r in got.items() if r == "entered"]
        assert len(winners) == 1, got
        for i, r in got.items():
            if i != winners[0]:
                assert r.startswith("refused: ") and str(out) in r and "is writing this output" in r, r
        assert [p.exitcode for p in procs] == [0] * 4
        assert (out / "who").read_text() == str(winners[0])
        assert beside(out) == ["out"], rep


def _replace_forever(out: str, stop: "multiprocessing.Event", count: "multiprocessing.Value") -> None:
    while not stop.is_set():
        with atomic_output_dir(out, step="swap") as tmp:
            (tmp / "result").write_text("complete")
        count.value += 1


def test_a_result_being_replaced_is_always_there(tmp_path: Path):
    out = tmp_path / "out"
    with atomic_output_dir(out, step="swap") as tmp:
        (tmp / "result").write_text("complete")
    stop, count = FORK.Event(), FORK.Value("i", 0)
    writer = FORK.Process(target=_replace_forever, args=(str(out), stop, count))
    writer.start()
    missing = seen = 0
    try:
        while count.value < 300:  # a reader watching 300 replacements
            seen += 1
            if not (out / "result").is_file():
                missing += 1
    finally:
        stop.set()
        writer.join(60)
    assert writer.exitcode == 0
    assert missing == 0, f"no output in {missing} of {seen} looks"


def test_a_replacement_killed_between_its_renames_is_undone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Where renameat2 cannot swap (not Linux, some filesystems), `out` is parked as .old- for a moment: a kill
    there leaves no `out`, and the next run, even a failing one, puts the previous result back."""
    out = tmp_path / "out"
    parked = tmp_path / ".out.old-999999"  # as left by the killed writer
    parked.mkdir()
    (parked / files.OUTPUT_MARKER).write_text('{"step": "swap"}\n')
    (parked / "result").write_text("previous")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(out, step="swap"):
            raise RuntimeError("boom")
    assert (out / "result").read_text() == "previous" and beside(out) == ["out"]
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)  # the fallback itself: still one result
    with atomic_output_dir(out, step="swap") as tmp:
        (tmp / "result").write_text("new")
    assert (out / "result").read_text() == "new" and beside(out) == ["out"]


KILLED_STEP = """
import sys, time
from deeplight.base.files import atomic_output_dir
with atomic_output_dir(sys.argv[1], step="ingest", legacy_files=("report.json",)) as tmp:
    (tmp / "train").mkdir()
    (tmp / "train" / "part-00000.parquet").write_bytes(b"x" * 100_000)
    print("writing", flush=True)
    time.sleep(600)
"""


def test_temp_folders_of_a_killed_run_are_removed_by_the_next_run(tmp_path: Path):
    raw = tmp_path / "raw.txt"
    synthesize("criteo", rows=300, seed=0, out=str(raw))
    out = tmp_path / "ingested"
    assert main(["ingest", "--input", str(raw), "--out", str(out)]) == 0
    for _ in range(2):  # two runs killed with SIGKILL in the middle of writing
        proc = subprocess.Popen([sys.executable, "-c", KILLED_STEP, str(out)], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline() == "writing\n"
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
    left = [n for n in beside(out) if n.startswith(".ingested.tmp-")]
    assert len(left) == 1  # the second killed run already removed the first one's
    (tmp_path / ".ingested.tmp-k3x9a1").mkdir()  # named as before this change (mkdtemp), by a killed run
    other = tmp_path / ".other.tmp-1"  # another output's temp folder is not this run's to remove
    other.mkdir()
    assert main(["ingest", "--input", str(raw), "--out", str(out)]) == 0
    assert beside(out) == sorted([".other.tmp-1", "ingested", "raw.txt", "raw.txt.truth.json"])
    assert (out / "report.json").is_file()


# --- permissions -----------------------------------------------------------------------------------------

def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("mask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)],
                         ids=["umask022", "umask077"])
def test_every_step_writes_the_umasks_usual_modes(tmp_path: Path, mask: int, file_mode: int, dir_mode: int,
                                                  monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = tmp_path / "raw.txt"
    synthesize("criteo", rows=2000, seed=0, out=str(raw))
    out = tmp_path / "out"
    small = ["--set", "model.dnn=[8]", "--set", "train.batch_size=512", "--threads", "1", "--no-mlflow"]
    old = os.umask(mask)
    try:
        assert main(["ingest", "--input", str(raw), "--out", str(out / "ingested")]) == 0
        assert main(["hash", "--input", str(out / "ingested"), "--out", str(out / "hashed"), "--min-count", "2"]) == 0
        assert main(["train", "--data", str(out / "hashed"), "--out", str(out / "dense"), "--epochs", "1",
                     *small]) == 0
        assert main(["prune", "--dense", str(out / "dense" / "best.pt"), "--data", str(out / "hashed"),
                     "--out", str(out / "pruned"), "--ramp-epochs", "0.5", "--finetune-epochs", "1", *small]) == 0
        assert main(["compact", "--checkpoint", str(out / "pruned" / "best.pt"), "--out", str(out / "compact"),
                     "--no-exports"]) == 0
        assert main(["evaluate", "--model", str(out / "pruned"), "--data", str(out / "hashed"),
                     "--out", str(out / "eval" / "test.json"), "--latency-rounds", "1", "--no-mlflow"]) == 0
    finally:
        os.umask(old)
    got = modes(out)
    for name in ("ingested/report.json", "ingested/dataset.json", "hashed/manifest.json", "dense/best.pt",
                 "dense/last.pt", "dense/results.json", "pruned/best.pt", "eval/test.json", "compact/stats.json"):
        assert name in got, sorted(got)
    want = {name: dir_mode if (out / name).is_dir() else file_mode for name in got}
    assert {k: oct(v) for k, v in got.items()} == {k: oct(v) for k, v in want.items()}
