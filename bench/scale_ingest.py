"""Per-file data steps (issue 20, item 3): fan-out vs one process for ingest + hash, on this machine.

    OMP_NUM_THREADS=1 .venv/bin/python bench/scale_ingest.py --files 4 --rows 250000 --repeat 3

On 4 synthetic Criteo files, with `--repeat` interleaved rounds (medians), in fresh processes:

- single: `ingest` of the 4 files + `hash_dataset` (today's steps: one process, its 2 parse/read threads);
- fan-out, 1 worker: the per-file path run file after file in one process (plan_files, then per file ingest_file +
  write_value_counts, feature_map_from_counts, per file apply_feature_map_to_part, gather_hashed): what the
  per-file path costs on top of the work itself (the row-counting pass, the counts written and merged, the gather);
- fan-out, 2 workers: the same with the per-file tasks shared by 2 processes ("pods"), each pinned to one parse and
  one read thread, as KFP's ParallelFor would run them on 2 one-core pods.

Each worker's own time per file (rows/s per worker) is what a projection to more pods starts from; the merge and the
gather are the serial part. Thread pools: OMP/OPENBLAS/MKL_NUM_THREADS=1 in every process; the data steps' own
pools are ingest.PARSE_THREADS and hashing.READ_THREADS (2 in `single`, 1 per fan-out worker). Writes a JSON to
bench/out/scale_ingest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# The bodies run in fresh interpreters (`python -c`), so imports and start-up count as a pod's would.
_SINGLE = """
import sys, time
from deeplight.data.ingest import ingest
from deeplight.data.hashing import hash_dataset
files, work = sys.argv[1].split(","), sys.argv[2]
t = time.perf_counter()
ingest("criteo", files, work + "/ingested")
hash_dataset(work + "/ingested", work + "/hashed", min_count=8)
print(time.perf_counter() - t)
"""

_PLAN = """
import json, sys, time
from deeplight.data.ingest import plan_files
t = time.perf_counter()
items = plan_files("criteo", sys.argv[1].split(","))
json.dump({"items": items, "s": time.perf_counter() - t}, open(sys.argv[2], "w"))
"""

_WORKER = """
import json, sys, time
import deeplight.data.ingest as ingest_mod, deeplight.data.hashing as hashing_mod
threads = int(sys.argv[4])
ingest_mod.PARSE_THREADS = hashing_mod.READ_THREADS = threads
from deeplight.data.ingest import ingest_file
from deeplight.data.hashing import apply_feature_map_to_part, write_value_counts
from deeplight.data.feature_map import FeatureMap
phase, work, indices = sys.argv[1], sys.argv[2], [int(i) for i in sys.argv[3].split(",")]
items = json.load(open(work + "/plan.json"))["items"]
t, per_file = time.perf_counter(), {}
for i in indices:
    s = time.perf_counter()
    if phase == "ingest":
        ingest_file("criteo", items[i], f"{work}/ingested-{i}")
        write_value_counts(f"{work}/ingested-{i}", f"{work}/counts-{i}")
    else:
        fmap = FeatureMap.load(work + "/feature_map.json")
        apply_feature_map_to_part(fmap, f"{work}/ingested-{i}", f"{work}/hashed-{i}")
    per_file[i] = time.perf_counter() - s
print(json.dumps({"s": time.perf_counter() - t, "per_file": per_file}))
"""

_MERGE = """
import sys, time
from deeplight.data.hashing import feature_map_from_counts
work, n = sys.argv[1], int(sys.argv[2])
t = time.perf_counter()
feature_map_from_counts([f"{work}/counts-{i}" for i in range(n)], min_count=8).save(work + "/feature_map.json")
print(time.perf_counter() - t)
"""

_GATHER = """
import sys, time
from deeplight.data.hashing import gather_hashed
work, n = sys.argv[1], int(sys.argv[2])
t = time.perf_counter()
gather_hashed([f"{work}/hashed-{i}" for i in range(n)], work + "/hashed")
print(time.perf_counter() - t)
"""


def _run(code: str, *args: str) -> str:
    env = {**os.environ, **THREAD_ENV, "PYTHONPATH": str(REPO)}
    done = subprocess.run([PY, "-c", code, *args], env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"benchmark step failed:\n{done.stderr[-3000:]}")
    lines = done.stdout.strip().splitlines()
    return lines[-1] if lines else ""  # the plan step writes its JSON to a file and prints nothing


def single(files: list[Path], work: Path) -> dict:
    t = time.perf_counter()
    inner = float(_run(_SINGLE, ",".join(map(str, files)), str(work)))
    return {"wall_s": time.perf_counter() - t, "work_s": inner}


def fan_out(files: list[Path], work: Path, workers: int) -> dict:
    """Per-file path with `workers` processes per phase (files dealt round-robin), each on one thread."""
    t0 = time.perf_counter()
    _run(_PLAN, ",".join(map(str, files)), str(work / "plan.json"))
    plan_s = json.loads((work / "plan.json").read_text())["s"]
    t_plan = time.perf_counter()
    phases = {}
    for phase, code in (("ingest", None), ("merge", _MERGE), ("apply", None), ("gather", _GATHER)):
        t = time.perf_counter()
        if code is not None:
            _run(code, str(work), str(len(files)))
        else:
            shares = [",".join(str(i) for i in range(w, len(files), workers)) for w in range(workers)]
            env = {**os.environ, **THREAD_ENV, "PYTHONPATH": str(REPO)}
            procs = [subprocess.Popen([PY, "-c", _WORKER, phase, str(work), share, "1"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for share in shares if share]
            outs = [p.communicate() for p in procs]
            if any(p.returncode for p in procs):
                raise SystemExit(f"{phase} worker failed:\n" + "\n".join(e[-2000:] for _, e in outs))
            phases[f"{phase}_per_file_s"] = sorted(v for o, _ in outs
                                                   for v in json.loads(o.strip().splitlines()[-1])["per_file"].values())
        phases[f"{phase}_wall_s"] = time.perf_counter() - t
    return {"wall_s": time.perf_counter() - t0, "plan_wall_s": t_plan - t0, "plan_s": plan_s, **phases}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--rows", type=int, default=250_000, help="rows per file")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "out" / "scale_ingest.json"))
    a = p.parse_args()
    sys.path.insert(0, str(REPO))
    from deeplight.data.synth import synthesize

    root = Path(tempfile.mkdtemp(prefix="scale-ingest-"))
    try:
        files = []
        for i in range(a.files):
            files.append(root / f"day_{i}.txt")
            synthesize("criteo", rows=a.rows, seed=100 + i, out=str(files[-1]))
        rounds: dict[str, list[dict]] = {"single": [], "fanout_1": [], "fanout_2": []}
        for r in range(a.repeat):  # interleaved, so load changes hit every variant alike
            for name in rounds:
                work = root / f"{name}-{r}"
                work.mkdir()
                rounds[name].append(single(files, work) if name == "single" else
                                    fan_out(files, work, int(name.split("_")[1])))
                shutil.rmtree(work)
                print(name, r, json.dumps(rounds[name][-1]), flush=True)
        rows = a.files * a.rows
        summary = {name: {k: statistics.median(x[k] for x in runs) for k in runs[0] if not k.endswith("per_file_s")}
                   for name, runs in rounds.items()}
        for name in ("fanout_1", "fanout_2"):
            per_file = [v for x in rounds[name] for v in x["ingest_per_file_s"]]
            apply = [v for x in rounds[name] for v in x["apply_per_file_s"]]
            summary[name]["worker_rows_per_s_ingest_count"] = a.rows / statistics.median(per_file)
            summary[name]["worker_rows_per_s_apply"] = a.rows / statistics.median(apply)
        for name in summary:
            summary[name]["rows_per_s"] = rows / summary[name]["wall_s"]
        result = {"files": a.files, "rows_per_file": a.rows, "repeat": a.repeat,
                  "median": summary, "rounds": rounds,
                  "ratios": {"fanout_1_vs_single_wall": summary["fanout_1"]["wall_s"] / summary["single"]["wall_s"],
                             "fanout_2_vs_single_wall": summary["fanout_2"]["wall_s"] / summary["single"]["wall_s"]}}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2))
        print(json.dumps({"median": summary, "ratios": result["ratios"]}, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
