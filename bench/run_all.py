"""`make bench`: every benchmark in one go, each writing its tables to bench/out/ (see bench/RESULTS.md).

    .venv/bin/python bench/run_all.py [--quick]

--quick uses smaller sizes (a smoke run of the scripts, not numbers to record).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED_CRITEO = HERE.parents[1] / "shared" / "data" / "criteo" / "train_10k.txt"


def run(*args: str) -> None:
    print(f"\n$ python {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    rows = ["200000"] if a.quick else ["2000000", "8000000"]
    run(str(HERE / "bench_data.py"), "--rows", *rows, "--pandas-rows", rows[0])
    run(str(HERE / "data_floor.py"), "--rows", rows[0])
    synth_rows = "100000" if a.quick else "1000000"
    run(str(HERE / "accuracy.py"), "--synthetic-rows", synth_rows, "--epochs", "3" if a.quick else "10")
    work = HERE / "out" / "accuracy-work"
    name = f"synth-criteo-{synth_rows}.txt"
    run(str(HERE / "inference.py"), "--dense", str(work / f"{name}.deepfwfm" / "best.pt"),
        "--pruned", str(work / f"{name}.pruned-unstructured" / "best.pt"),
        "--pruned", str(work / f"{name}.pruned-structured" / "best.pt"), "--data", str(work / f"{name}.hashed"),
        "--profile")
    if SHARED_CRITEO.exists():
        run(str(HERE / "accuracy.py"), "--raw", str(SHARED_CRITEO), "--epochs", "20")
    run(str(HERE / "inference.py"), "--synthetic", "--profile")
    run(str(HERE / "serving.py"), *(["--quick"] if a.quick else []))


if __name__ == "__main__":
    main()
