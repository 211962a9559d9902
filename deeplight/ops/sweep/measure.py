"""What a trial is measured on: the data view without test, batch-1 latency of the compact engine."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from deeplight.base.errors import DeeplightError


def valid_view(data_dir: str | Path, out: Path) -> Path:
    """A view of a hashed dataset without its test split (symlinks to train/ and valid/, test rows = 0), so that
    pruning cannot score the test split during the sweep. Built once, atomically; shared by concurrent workers."""
    from deeplight.data.loader import read_manifest
    from deeplight.base.files import write_json

    manifest = read_manifest(data_dir)
    view_manifest = {**manifest, "rows": {**manifest["rows"], "test": 0}, "view_of": str(Path(data_dir).resolve())}

    def current() -> bool:
        return (out / "manifest.json").exists() and json.loads((out / "manifest.json").read_text()) == view_manifest

    if current():
        return out
    tmp = out.parent / f".{out.name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split in ("train", "valid"):
        (tmp / split).symlink_to((Path(data_dir) / split).resolve(), target_is_directory=True)
    write_json(tmp / "manifest.json", view_manifest)
    if out.exists() and not current():  # a view of other data: replace it
        shutil.rmtree(out)
    try:
        tmp.rename(out)
    except OSError:  # another worker won the race with the same view
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def latency_ids(data_dir: str | Path, limit: int = 4096) -> np.ndarray:
    """Up to `limit` rows of test-split ids (int64, C order) to time on; labels are not read."""
    import pyarrow.parquet as pq

    from deeplight.data.loader import read_manifest, split_files

    names = list(read_manifest(data_dir)["field_names"])
    parts, rows = [], 0
    for path in split_files(data_dir, "test"):
        table = pq.read_table(path, columns=names)
        parts.append(np.stack([table[n].to_numpy() for n in names], axis=1).astype(np.int64))
        rows += table.num_rows
        if rows >= limit:
            break
    if not rows:
        raise DeeplightError(f"{data_dir}: the test split is empty; the latency objective times real test ids")
    return np.ascontiguousarray(np.concatenate(parts)[:limit])


def compact_of(checkpoint_path: str | Path) -> Any:
    from deeplight.model.checkpoint import load_model
    from deeplight.serve.engine import CompactModel

    model, ck = load_model(checkpoint_path)
    return CompactModel.from_model(model, ck.get("field_names"))


def batch1_latency_us(models: list[Any], ids: np.ndarray, calls: int) -> list[float]:
    """Median batch-1 latency (us) of each compact model's `score_one`, one call per row of `ids` (cycled),
    models interleaved in chunks so that machine noise hits them alike. Numba kernels are single-threaded."""
    rows = [np.ascontiguousarray(ids[i % len(ids)]) for i in range(calls)]
    times: list[list[float]] = [[] for _ in models]
    for m in models:
        for x in rows[:20]:  # warm up: numba loads its cache, caches fill
            m.score_one(x)
    chunk = max(10, calls // 10)
    for start in range(0, calls, chunk):
        for k, m in enumerate(models):
            for x in rows[start:start + chunk]:
                t = time.perf_counter()
                m.score_one(x)
                times[k].append(time.perf_counter() - t)
    return [float(np.median(t)) * 1e6 for t in times]
