"""The floor under ingest + hash: what process start-up and pyarrow's Parquet I/O alone cost, against the steps.

    .venv/bin/python bench/data_floor.py --rows 2000000 --repeat 5

Issue 2 asks for 500k rows/s end to end (2M rows in 4.0 s) on this 2-core machine. Both steps must write and read
Parquet, and they do it through pyarrow; this script times the parts that no parser, counter or mapper of ours can
remove, each with the steps' own code and settings, on the steps' own output:

- start-up: `deeplight ingest` + `deeplight hash` on a 1,000-row file (interpreter, imports, numba's set-up, exit);
- raw read: the input read in ingest's 16 MB blocks, newlines counted (the least any parser does to the bytes);
- ingest write: ingest's split writers writing the ingested tables again;
- hash reads: hash's row-group reader (`_map_row_groups`) over train twice (fit, then ids), valid and test, with a
  no-op instead of counting or mapping; one reader thread, not hash's two (two cost ~25% more CPU for the same
  reads, and the floor takes the cheaper);
- ids write: hash's id writer writing the hashed tables again.

The floor assumes the two cores are always both busy with nothing but those parts:
floor = start-up + (raw read + ingest write) / 2 + (hash reads + ids write) / 2. The steps themselves run as fresh
CLI processes (`--repeat` interleaved runs, medians); what is left of their CPU after the floor's parts is what
parsing, checking, splitting, counting, mapping and glue cost.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench_data import PY, run_process  # this directory is on sys.path when a script here runs

HERE = Path(__file__).resolve().parent
TARGET_ROWS_PER_S = 500_000


def run_cli(args: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of one `deeplight` command in a fresh process."""
    wall, usage = run_process([PY, "-m", "deeplight.cli", *args], env)
    return wall, usage.ru_utime + usage.ru_stime


def steps(raw: Path, work: Path, env: dict) -> dict[str, float]:
    """Wall and CPU seconds of `deeplight ingest` then `deeplight hash` on `raw` (outputs under `work`)."""
    ing, hashed = work / f"{raw.stem}.ingested", work / f"{raw.stem}.hashed"
    w_ing, c_ing = run_cli(["ingest", "--dataset", "criteo", "--input", str(raw), "--out", str(ing)], env)
    w_hash, c_hash = run_cli(["hash", "--input", str(ing), "--out", str(hashed)], env)
    return {"wall_s": w_ing + w_hash, "cpu_s": c_ing + c_hash, "ingest_wall_s": w_ing, "hash_wall_s": w_hash}


def process_cpu(fn) -> float:
    """CPU seconds of every thread of this process while fn() runs."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def codec_parts(raw: Path, ingested: Path, hashed: Path, scratch: Path) -> dict[str, float]:
    """CPU seconds of each pyarrow I/O part, done with the steps' own code on the steps' own output."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from deeplight.data import hashing
    from deeplight.data.feature_map import FeatureMap

    from deeplight.data import ingest
    from deeplight.data.parser import count_lines
    from deeplight.data.schema import get_schema

    schema = get_schema("criteo")
    fields = FeatureMap.hashed(schema.name, 2).fields  # the schema's fields; only their columns matter
    tables = {s: pq.read_table(ingested / s) for s in ingest.SPLITS}
    ids = {s: pq.read_table(hashed / s) for s in ingest.SPLITS}
    block = bytearray(ingest.BLOCK_BYTES)

    def raw_read() -> None:
        with open(raw, "rb", buffering=0) as f:
            while n := f.readinto(block):
                count_lines(memoryview(block)[:n])

    def ingest_write() -> None:
        shutil.rmtree(scratch, ignore_errors=True)
        for split, table in tables.items():
            writer = ingest._SplitWriter(scratch / split, table.schema, ingest.PART_ROWS, ingest.ROW_GROUP_ROWS)
            for batch in table.to_batches(max_chunksize=70_000):  # about one 16 MB block's rows
                writer.write(pa.Table.from_batches([batch]))
            writer.close()

    def hash_reads() -> None:
        threads, hashing.READ_THREADS = hashing.READ_THREADS, 1
        try:
            for split, times in (("train", 2), ("valid", 1), ("test", 1)):
                files = sorted((ingested / split).glob("*.parquet"))
                for _ in range(times):
                    for _ in hashing._map_row_groups(files, schema, fields, lambda batch, path, start: None):
                        pass
        finally:
            hashing.READ_THREADS = threads

    def ids_write() -> None:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        for split, table in ids.items():
            writer = hashing.id_writer(scratch / f"{split}.parquet", table.schema)
            for batch in table.to_batches(max_chunksize=hashing.BATCH_ROWS):
                writer.write_batch(batch)
            writer.close()

    raw_read()  # compiles the newline counter, warms the page cache
    parts = {"raw read": raw_read, "ingest write": ingest_write, "hash reads": hash_reads, "ids write": ids_write}
    out = {name: process_cpu(fn) for name, fn in parts.items()}
    shutil.rmtree(scratch, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measurement; medians are shown")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores the floor may keep busy")
    ap.add_argument("--work", default=None, help="scratch dir (default: a temp dir)")
    ap.add_argument("--out", default=str(HERE / "out" / "data_floor.json"))
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="deeplight-floor-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    raws = {}
    for rows in (1_000, a.rows):
        raws[rows] = work / f"criteo_{rows}.txt"
        if not raws[rows].exists():
            run_cli(["synth", "--rows", str(rows), "--out", str(raws[rows])], env)

    startup, full, codec = [], [], []
    for _ in range(a.repeat):  # interleaved, so that a noisy spell hits every measurement alike
        startup.append(steps(raws[1_000], work, env))
        full.append(steps(raws[a.rows], work, env))
        stem = raws[a.rows].stem
        codec.append(codec_parts(raws[a.rows], work / f"{stem}.ingested", work / f"{stem}.hashed", work / "codec"))

    def med(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    rows = a.rows
    parts = {name: med(codec, name) for name in codec[0]}
    start_wall, start_cpu = med(startup, "wall_s"), med(startup, "cpu_s")
    floor = start_wall + sum(parts.values()) / a.cores
    wall, cpu = med(full, "wall_s"), med(full, "cpu_s")
    target = rows / TARGET_ROWS_PER_S
    rest_cpu = cpu - start_cpu - sum(parts.values())
    result = {
        "rows": rows, "cores": a.cores, "repeat": a.repeat, "target_s": target,
        "startup": {"wall_s": start_wall, "cpu_s": start_cpu}, "codec_cpu_s": parts, "floor_s": floor,
        "steps": {"wall_s": wall, "cpu_s": cpu, "ingest_wall_s": med(full, "ingest_wall_s"),
                  "hash_wall_s": med(full, "hash_wall_s"), "walls_s": [round(r["wall_s"], 3) for r in full]},
        "rest_cpu_s": rest_cpu, "rest_budget_cpu_s": (target - floor) * a.cores,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))

    us = 1e6 / rows
    print(f"\n{rows:,} rows, {a.cores} cores, medians of {a.repeat}\n\n| part | seconds | us per row |\n|---|---|---|")
    print(f"| start-up of both commands (1,000-row file), wall | {start_wall:.2f} | - |")
    for name, s in parts.items():
        print(f"| {name}, CPU | {s:.2f} | {s * us:.2f} |")
    print(f"| **floor**: start-up + I/O CPU / {a.cores} | **{floor:.2f}** | - |")
    print(f"| ingest + hash as run, wall | {wall:.2f} | - |")
    print(f"| ingest + hash as run, CPU | {cpu:.2f} | {cpu * us:.2f} |")
    print(f"| CPU beyond start-up and I/O (parse, check, split, count, map, glue) | {rest_cpu:.2f} | "
          f"{rest_cpu * us:.2f} |")
    print(f"| 500k rows/s target, wall | {target:.2f} | - |")
    print(f"| CPU left for everything beyond start-up and I/O at the target, {a.cores} cores always busy | "
          f"{result['rest_budget_cpu_s']:.2f} | {result['rest_budget_cpu_s'] * us:.2f} |")


if __name__ == "__main__":
    main()
