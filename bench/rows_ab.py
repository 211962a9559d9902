"""A/B of the raw-rows -> ids path (`deeplight.serve.rows`) against another git revision, in one process.

    .venv/bin/python bench/rows_ab.py                      # this checkout vs HEAD
    .venv/bin/python bench/rows_ab.py --against 636580a --rounds 60

Both versions of rows.py (this checkout's and the revision's, loaded from `git show`) convert the same raw rows
with the same feature map; the script first checks that their ids are identical. Then, in alternating order
round after round (noise hits both alike), it times per 1,000-row call:

- kernel: the compiled pass alone, on the already split text buffers (`_text_kernel`);
- frame: `RowsToIds.transform` of a DataFrame of str columns (what the pyfunc gets);
- records: `RowsToIds.transform` of a list of dicts (what `deeplight serve` v1 JSON gets when it decodes);
- json body: `RowsToIds.transform_json_records` of the same records as a v1 JSON body (`json.dumps`), what
  `deeplight serve` v1 reads in one pass (when both revisions have it).

Each call takes the next of `--frames` different sets of rows, so no call finds the previous call's Python
strings in cache. Defaults read the feature map and raw lines that bench/serving.py builds
(bench/out/serving-work). One thread: OMP/OpenBLAS/MKL/NUMBA pinned to 1 before numpy loads (the path uses no
BLAS). Prints a Markdown table of medians (p25..p75) in ms and the ratio old / new.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads its thread pools

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORK = REPO / "bench" / "out" / "serving-work"


def load_revision(rev: str, where: Path, source: str = "deeplight/serve/rows.py") -> Any:
    """`source` as of `rev`, imported as a module of its own (its numba cache beside it)."""
    text = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{source}"], check=True,
                          capture_output=True, text=True).stdout
    name = Path(source).stem + "_at_revision"
    path = where / f"{name}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def quartiles(ms: list[float]) -> tuple[float, float, float]:
    p25, p50, p75 = np.percentile(ms, [25, 50, 75])
    return float(p25), float(p50), float(p75)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", default="HEAD", help="git revision to compare with (default HEAD)")
    ap.add_argument("--feature-map", default=str(WORK / "hashed" / "feature_map.json"))
    ap.add_argument("--raw", default=str(WORK / "raw.txt"), help="raw Criteo lines (tab-separated, label first)")
    ap.add_argument("--rows", type=int, default=1000, help="rows per call")
    ap.add_argument("--frames", type=int, default=8, help="different sets of rows, used in turn")
    ap.add_argument("--rounds", type=int, default=40)
    a = ap.parse_args()

    import pandas as pd

    from deeplight.data.feature_map import FeatureMap
    from deeplight.data.schema import get_schema
    from deeplight.serve import rows as rows_new

    for path in (a.feature_map, a.raw):
        if not Path(path).exists():
            sys.exit(f"{path}: not found (run bench/serving.py first, or pass --feature-map and --raw)")
    fmap = FeatureMap.load(a.feature_map)
    if fmap.dataset != "criteo":
        sys.exit(f"{a.feature_map}: a {fmap.dataset} feature map; this benchmark reads raw Criteo lines")
    features = [c.name for c in get_schema("criteo").columns][1:]
    with open(a.raw) as f:
        lines = f.read().splitlines()[-a.rows * a.frames:]
    if len(lines) < a.rows * a.frames:
        sys.exit(f"{a.raw}: {len(lines)} lines, need {a.rows * a.frames}")
    split = [line.split("\t")[1:] for line in lines]
    chunks = [split[i * a.rows:(i + 1) * a.rows] for i in range(a.frames)]
    frames = [pd.DataFrame(c, columns=features) for c in chunks]
    records = [[dict(zip(features, r)) for r in c] for c in chunks]
    bodies = [json.dumps({"instances": r}).encode() for r in records]

    with tempfile.TemporaryDirectory() as tmp:
        versions = {a.against: load_revision(a.against, Path(tmp)).RowsToIds(fmap), "this checkout":
                    rows_new.RowsToIds(fmap)}
        ref = None
        for name, conv in versions.items():
            got = [conv.transform(df, np.int64) for df in frames]
            if ref is None:
                ref = got
            elif not all(np.array_equal(x, y) for x, y in zip(ref, got)):
                sys.exit(f"the ids of {name} differ from those of {a.against}")

        def split_buffers(conv: Any) -> list[tuple]:
            out = []
            for df in frames:
                n, plan, _, values = conv._text_route(df)
                if isinstance(values, np.ndarray):  # a frame's values as a 2-D object array (since 2026-12-08)
                    values = values.ravel().tolist()
                joined = np.frombuffer("\x1f".join(values).encode(), np.uint8)
                off, data = np.empty(n * plan.k + 1, np.int64), np.empty(len(joined), np.uint8)
                assert sys.modules[type(conv).__module__]._split_joined(joined, n * plan.k, off, data)
                out.append((n, plan, off, data))
            return out

        buffers = {name: split_buffers(conv) for name, conv in versions.items()}
        cases: dict[str, Callable[[Any, str, int], Any]] = {
            "kernel": lambda conv, name, i: conv._text_kernel(*_kernel_args(buffers[name][i])),
            "frame": lambda conv, name, i: conv.transform(frames[i], np.int64),
            "records": lambda conv, name, i: conv.transform(records[i], np.int64),
        }
        if all(hasattr(conv, "transform_json_records") for conv in versions.values()):
            for name, conv in versions.items():
                got = [conv.transform_json_records(b, np.int64) for b in bodies]
                if not all(x is not None and np.array_equal(x, y) for x, y in zip(got, ref)):
                    sys.exit(f"the ids of {name} from JSON bodies differ from those of {a.against}'s frames")
            cases["json body"] = lambda conv, name, i: conv.transform_json_records(bodies[i], np.int64)
        times: dict[tuple[str, str], list[float]] = {(c, v): [] for c in cases for v in versions}
        order = list(versions)
        for r in range(a.rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                conv = versions[name]
                for case, call in cases.items():
                    t = time.perf_counter()
                    for i in range(a.frames):
                        call(conv, name, i)
                    times[(case, name)].append((time.perf_counter() - t) / a.frames * 1e3)

    old, new = a.against, "this checkout"
    print(f"{a.rows:,} rows per call, {a.frames} sets of rows in turn, {a.rounds} rounds; load average "
          f"{os.getloadavg()[0]:.2f}; ms per call, median (p25..p75)\n")
    print(f"| step | {old} | {new} | {old} / {new} |\n|---|---|---|---|")
    for case in cases:
        q_old, q_new = quartiles(times[(case, old)]), quartiles(times[(case, new)])
        print(f"| {case} | {q_old[1]:.2f} ({q_old[0]:.2f}..{q_old[2]:.2f}) | {q_new[1]:.2f} ({q_new[0]:.2f}.."
              f"{q_new[2]:.2f}) | {q_old[1] / q_new[1]:.2f}x |")


def _kernel_args(buf: tuple) -> tuple:
    n, plan, off, data = buf
    return n, plan.col_src, plan.pos, plan.stride_row, off, data, np.int64


if __name__ == "__main__":
    main()
