"""Shared test helpers: small hashed datasets made in code, paths to the optional real samples."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CRITEO_SAMPLE = SHARED_DATA / "criteo" / "train_10k.txt"
AVAZU_SAMPLE = SHARED_DATA / "avazu" / "train_8k.csv"


def write_hashed_dataset(out: Path, rows: int = 20_000, field_sizes: tuple[int, ...] = (50, 30, 20, 10, 8, 5),
                         planted: tuple[tuple[int, int], ...] = ((0, 1),), seed: int = 0,
                         split: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> Path:
    """A dataset in the hashed contract whose clicks follow a known logistic model with per-value effects and
    planted field-pair interactions (pairs of field indices in `planted`)."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.integers(0, s, rows) for s in field_sizes], axis=1).astype(np.int32)
    effects = [rng.normal(0, 0.6, s) for s in field_sizes]
    signs = [rng.choice([-1.0, 1.0], s) for s in field_sizes]
    logit = -1.2 + sum(effects[f][ids[:, f]] for f in range(len(field_sizes)))
    for a, b in planted:
        logit += 1.0 * signs[a][ids[:, a]] * signs[b][ids[:, b]]
    labels = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    names = [f"f{i}" for i in range(len(field_sizes))]
    bounds = np.cumsum([int(rows * split[0]), int(rows * split[1])])
    parts = {"train": slice(0, bounds[0]), "valid": slice(bounds[0], bounds[1]), "test": slice(bounds[1], rows)}
    fingerprints, counts = {}, {}
    for split_name, sl in parts.items():
        (out / split_name).mkdir(parents=True, exist_ok=True)
        table = pa.table({**{n: ids[sl, i] for i, n in enumerate(names)}, "label": labels[sl]})
        pq.write_table(table, out / split_name / "part-00000.parquet")
        counts[split_name] = table.num_rows
        fingerprints[split_name] = f"fp-{split_name}-{seed}-{rows}"
    manifest = {"dataset": "toy", "field_names": names, "field_sizes": list(field_sizes), "rows": counts,
                "fingerprints": fingerprints, "feature_map_fingerprint": f"fm-{seed}"}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


DURATIONS = Path(__file__).with_name("durations.json")  # seconds per test file; tests/record_durations.py writes it


def pytest_collection_modifyitems(session, config, items):
    """Files in the order `make test`'s workers take them (--dist loadfile hands out whole files in this order,
    with --no-loadscope-reorder): the docstring examples first (see pyproject.toml), then the test files longest
    first by the seconds each took in a recorded run (tests/durations.json), so that no worker is left with a long
    file at the end while the other waits. A file not in the record counts as the longest when it holds slow or
    integration tests, else as the shortest. Stable: a file's tests keep their order."""
    recorded = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
    longest = max(recorded.values(), default=0.0)
    order: dict[str, tuple[int, float]] = {}
    for item in items:
        path = item.nodeid.split("::")[0]
        if isinstance(item, pytest.DoctestItem):
            order[path] = (0, 0.0)
        elif path in recorded:
            order[path] = (1, -recorded[path])
        elif any(item.get_closest_marker(m) for m in ("slow", "integration")):
            order[path] = (1, -longest)
        else:
            order.setdefault(path, (1, 0.0))
    items.sort(key=lambda item: order[item.nodeid.split("::")[0]])


@pytest.fixture
def toy_hashed(tmp_path: Path) -> Path:
    return write_hashed_dataset(tmp_path / "hashed")


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An embedded sqlite MLflow store in a temp dir (the same kind `make run` uses)."""
    mlruns = tmp_path / "mlruns"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DEEPLIGHT_MLRUNS", str(mlruns))
    return mlruns


@pytest.fixture
def moto_s3(monkeypatch):
    """A boto3 S3 client on a real moto S3 server on 127.0.0.1, with the env that points deeplight at it."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "DEEPLIGHT_S3_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(k, v)
        yield boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    finally:
        server.stop()
