"""Ingest + hash throughput and peak memory, side by side with a plain pandas version of the same steps.

    .venv/bin/python bench/bench_data.py --rows 2000000 8000000 --pandas-rows 2000000

Each measured step runs in a fresh subprocess so that its peak RSS (ru_maxrss from wait4) is its own. Each
implementation runs --repeat times, interleaved with the other; the table shows median times, every run's total
and the highest peak RSS.
The pandas version reads the whole file (that is what a plain pandas script does), validates the label and int
columns, splits 80/10/10 at random, fits a min-count vocabulary on train and maps every split, and writes Parquet.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable

PANDAS_SCRIPT = r'''
import sys, numpy as np, pandas as pd
from deeplight.data.schema import get_schema
raw, out, min_count = sys.argv[1], sys.argv[2], int(sys.argv[3])
schema = get_schema("criteo")
df = pd.read_csv(raw, sep="\t", header=None, names=schema.names, dtype=str, keep_default_na=False,
                 quoting=3, engine="c")
good = df["label"].isin(["0", "1"])
ints = [c.name for c in schema.columns if c.kind == "int"]
cats = [c.name for c in schema.columns if c.kind == "cat"]
for c in ints:
    good &= df[c].str.fullmatch(r"-?[0-9]*")
df = df[good]
for c in ints:
    v = pd.to_numeric(df[c].replace("", np.nan))
    t = np.where(v > 2, np.floor(np.log(v.clip(lower=1)) ** 2), v)
    df[c] = pd.Series(t, index=df.index).astype("Int64").astype(str).replace("<NA>", "")
u = np.random.default_rng(0).random(len(df))
split = np.where(u < 0.8, "train", np.where(u < 0.9, "valid", "test"))
train = df[split == "train"]
out_cols = {}
for c in ints + cats:
    counts = train[c][train[c] != ""].value_counts()
    vocab = counts[counts >= min_count].index
    index = pd.Series(np.arange(2, len(vocab) + 2, dtype=np.int32), index=vocab)
    ids = df[c].map(index).fillna(1).astype(np.int32)
    ids[df[c] == ""] = 0
    out_cols[c] = ids.to_numpy()
res = pd.DataFrame(out_cols)
res["label"] = df["label"].astype(np.float32).to_numpy()
for name in ("train", "valid", "test"):
    res[split == name].to_parquet(f"{out}/{name}.parquet")
'''


def run_process(cmd: list[str], env: dict | None = None) -> tuple[float, resource.struct_rusage]:
    """(wall seconds, resource usage from wait4) of one command in its own process; exits if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    return seconds, usage


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one command in its own process."""
    seconds, usage = run_process(cmd, env)
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[2_000_000, 8_000_000])
    ap.add_argument("--pandas-rows", type=int, default=2_000_000, help="rows for the pandas run (0: skip)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of each implementation, interleaved; the table shows medians (the machine is noisy)")
    ap.add_argument("--work", default=None, help="scratch dir (default: a temp dir)")
    ap.add_argument("--out", default=str(HERE / "out" / "data.json"))
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="deeplight-bench-"))
    env = {**os.environ, "TQDM_DISABLE": "1"}
    results = []
    for rows in a.rows:
        raw = work / f"criteo_{rows}.txt"
        if not raw.exists():
            t, _ = run_measured([PY, "-m", "deeplight.cli", "synth", "--rows", str(rows), "--out", str(raw)], env)
            print(f"synth {rows:,} rows: {t:.1f}s ({rows / t:,.0f} rows/s)")
        runs: dict[str, list[dict]] = {"deeplight": [], "pandas": []}
        for _ in range(a.repeat):  # interleaved, so that a noisy spell hits both alike
            t_ing, rss_ing = run_measured([PY, "-m", "deeplight.cli", "ingest", "--input", str(raw), "--out",
                                           str(work / f"ing_{rows}")], env)
            t_hash, rss_hash = run_measured([PY, "-m", "deeplight.cli", "hash", "--input",
                                             str(work / f"ing_{rows}"), "--out", str(work / f"hash_{rows}")], env)
            runs["deeplight"].append({"ingest_s": t_ing, "hash_s": t_hash, "total_s": t_ing + t_hash,
                                      "peak_rss_mib": max(rss_ing, rss_hash)})
            print(json.dumps({"impl": "deeplight", "rows": rows, **runs["deeplight"][-1]}))
            if rows == a.pandas_rows:
                out = work / f"pandas_{rows}"
                out.mkdir(exist_ok=True)
                t_pd, rss_pd = run_measured([PY, "-c", PANDAS_SCRIPT, str(raw), str(out), "8"], env)
                runs["pandas"].append({"total_s": t_pd, "peak_rss_mib": rss_pd})
                print(json.dumps({"impl": "pandas", "rows": rows, **runs["pandas"][-1]}))
        for impl, rs in runs.items():
            if not rs:
                continue
            row = {"impl": impl, "rows": rows, "runs": len(rs),
                   **{k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "peak_rss_mib"},
                   "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
                   "total_s_all": [round(r["total_s"], 3) for r in rs], "raw_mib": raw.stat().st_size / 2**20}
            row["rows_per_s"] = rows / row["total_s"]
            results.append(row)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"machine": {"cpus": os.cpu_count()}, "results": results}, indent=2))
    print(f"\n| impl | rows | ingest s | hash s | rows/s (ingest+hash) | peak RSS MiB | all runs, s |\n"
          "|---|---|---|---|---|---|---|")
    for r in results:
        steps = (f"{r['ingest_s']:.2f} | {r['hash_s']:.2f}" if r["impl"] == "deeplight" else "- | -")
        print(f"| {r['impl']} | {r['rows']:,} | {steps} | {r['rows_per_s']:,.0f} | {r['peak_rss_mib']:,.0f} | "
              f"{', '.join(f'{t:.2f}' for t in r['total_s_all'])} |")
    for rows in a.rows:
        pair = {r["impl"]: r for r in results if r["rows"] == rows}
        if len(pair) == 2:
            print(f"\n{rows:,} rows: deeplight is {pair['pandas']['total_s'] / pair['deeplight']['total_s']:.1f}x "
                  "pandas (medians)")


if __name__ == "__main__":
    main()
