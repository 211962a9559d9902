"""Serving benchmark: dense vs pruned registered models, in-process and over HTTP, quiet and oversubscribed.

    .venv/bin/python bench/serving.py [--rows 100000] [--work DIR] [--requests 2000] [--seconds 2] [--out F.json]
    .venv/bin/python bench/serving.py --quick          # tiny sizes: a smoke run (tests/test_bench_serving.py)

One run builds (or reuses, under --work) a dense and a structured-pruned model (synth -> ingest -> hash -> train ->
prune -> register, in a scratch MLflow store `sqlite:///WORK/mlflow.db`, artifacts under WORK/mlruns), then, in
that one run so that the dense/pruned ratios are read from the same machine state:

- engine: `CompactModel.score` on hashed ids, batches of 1 / 100 / 1,000 rows (the pyfunc's own engine);
- in-process: `mlflow.pyfunc.load_model("models:/NAME@challenger").predict(DataFrame of raw rows)` ("pyfunc"),
  and the `RawRowScorer.score` it wraps on the same DataFrames ("scorer": the pyfunc minus MLflow's wrapper);
- HTTP, one worker each, on 127.0.0.1: `mlflow models serve` (POST /invocations, dataframe_split) and
  `deeplight serve` (KServe: v1 /v1/models/deeplight:predict with records, v2 /v2/models/deeplight/infer with one
  BYTES tensor per raw column, and "kserve-tsv": v1 with the rows as raw tab-separated lines,
  text/tab-separated-values); 1 / 100 / 1,000 rows per request, a closed-loop load generator (threads, one
  persistent http.client connection each) at concurrency 1 and 8;
- all of the above again under 2x CPU oversubscription: 2 x nproc - 1 busy-loop processes owned by this script
  (with the timed thread, twice as many runnable threads as cores; each bounded in time and exiting when this
  script dies), killed by PID afterwards;
- malformed requests to every server (and the in-process pyfunc): a field missing from one record of a batch, a
  misspelt key, a non-integer in I5, label 'yes'; status code and whether the body names the row and field;
- parity: each server's predictions for 100 rows against the in-process pyfunc's.

Every cell (path, model, rows per request, concurrency, condition) is bounded by --requests calls and --seconds
seconds, split over --rounds rounds that alternate dense and pruned (noise hits both alike). Latency is per call
(client side for HTTP: JSON already encoded, response parsed and its length checked after the clock stops);
rows/s is rows scored / wall seconds of the cell (closed loop: a client-limited rate at concurrency 1).

Threads: this process pins OMP/OpenBLAS/MKL/NUMBA to 1 thread through the environment before numpy loads, and
the engine pins its own BLAS to 1 thread with threadpoolctl (`deeplight.serve.threads`, checked; the JSON lists
every thread pool). The servers get the same environment plus DEEPLIGHT_ENGINE_THREADS=1 (`deeplight serve
--threads 1`). Nothing timed uses torch (training, in subprocesses, is not timed). The load generator's client
threads share the two cores with the servers: the HTTP numbers include that.

Rows for requests are raw Criteo lines (the last lines of the synthetic raw file), split on tabs into the 40
columns; the label is dropped from timed requests. Writes JSON to --out (default bench/out/serving.json) and the
Markdown tables to stdout.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads its thread pools
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
VENV_BIN = str(Path(PY).parent)

SIZES = (1, 100, 1000)
CONCURRENCY = (1, 8)
MODELS = ("dense", "pruned")
ENDPOINTS = ("mlflow", "kserve-v1", "kserve-v2", "kserve-tsv")
TSV = "text/tab-separated-values"
NAMES = {"dense": "bench-dense", "pruned": "bench-pruned"}
ALIAS = "challenger"
KSERVE_NAME = "deeplight"
PRUNE = ["--mode", "structured", "--dnn", "0.95", "--field", "0.9865", "--embedding", "0.6"]
GOALS = {"inproc_1row_ms": 0.2, "inproc_1000_rows_per_s": 300_000, "http_p50_1row_ms": 2.0,
         "http_p50_1000_ms": 10.0, "http_p99_over_p50": 3.0, "http_pruned_over_dense_1000": 3.0,
         "oversub_engine_ratio": 2.0}

BUSY_LOOP = """
import os, sys, time
end, parent = time.monotonic() + float(sys.argv[1]), os.getppid()
while time.monotonic() < end and os.getppid() == parent:
    for _ in range(200000):
        pass
"""


# ---------------------------------------------------------------------------------------------------------------
# Load average, sampled in the background with the phase it belongs to


class LoadSampler:
    def __init__(self, every: float = 2.0):
        self.samples: list[tuple[float, str, float, float, float]] = []
        self.phase = "start"
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def sample(self) -> None:
        self.samples.append((round(time.monotonic() - self._t0, 1), self.phase, *os.getloadavg()))

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.sample()

    def set_phase(self, phase: str) -> None:
        self.sample()
        self.phase = phase
        self.sample()

    def __enter__(self) -> "LoadSampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()

    def by_phase(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for phase in dict.fromkeys(s[1] for s in self.samples):
            l1 = [s[2] for s in self.samples if s[1] == phase]
            out[phase] = {"load1_min": min(l1), "load1_max": max(l1), "load1_mean": round(sum(l1) / len(l1), 2),
                          "samples": len(l1)}
        return out


# ---------------------------------------------------------------------------------------------------------------
# Models


def run_cli(args: list[str], env: dict, cwd: Path) -> str:
    """stdout of one `deeplight` command in a fresh process (cwd: the work dir, so ./mlruns lands there)."""
    proc = subprocess.run([PY, "-m", "deeplight.cli", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"failed: deeplight {' '.join(args)}\n{proc.stderr[-3000:]}")
    return proc.stdout


def build_models(work: Path, rows: int, quick: bool, env: dict) -> dict[str, Any]:
    """synth -> ingest -> hash -> train dense -> prune (structured) -> register both; each step skipped when its
    output is already under `work`. Returns {"raw": path, "registered": {model: register's JSON}}."""
    raw, ing, hashed = work / "raw.txt", work / "ing", work / "hashed"
    dense, pruned = work / "dense", work / "pruned"
    small = ["--set", "train.batch_size=256"] if quick else []
    steps = [
        (raw, ["synth", "--rows", str(rows), "--out", str(raw)]),
        (ing / "report.json", ["ingest", "--input", str(raw), "--out", str(ing)]),
        (hashed / "feature_map.json", ["hash", "--input", str(ing), "--out", str(hashed)]),
        (dense / "best.pt", ["train", "--data", str(hashed), "--out", str(dense), "--epochs", "1", "--no-mlflow",
                             *small]),
        (pruned / "best.pt", ["prune", "--dense", str(dense / "best.pt"), "--data", str(hashed), "--out",
                              str(pruned), *PRUNE, "--ramp-epochs", "1", "--finetune-epochs", "1", "--no-mlflow",
                              *small]),
    ]
    for done, args in steps:
        if not done.exists():
            t = time.perf_counter()
            run_cli(args, env, work)
            print(f"  deeplight {args[0]}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    registered_file = work / "registered.json"
    registered = json.loads(registered_file.read_text()) if registered_file.exists() else {}
    for model, checkpoint in (("dense", dense), ("pruned", pruned)):
        if model not in registered:
            out = run_cli(["register", "--model", str(checkpoint), "--data", str(hashed), "--name", NAMES[model]],
                          env, work)
            registered[model] = json.loads(out[out.index("{"):])
            registered_file.write_text(json.dumps(registered, indent=2))
    return {"raw": raw, "registered": registered}


def raw_records(raw: Path, n: int) -> tuple[list[str], list[list[str]]]:
    """(the 40 Criteo column names, the last n raw lines split on tabs)."""
    from deeplight.data.schema import get_schema

    columns = [c.name for c in get_schema("criteo").columns]
    with open(raw, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 400 * (n + 10)))
        lines = f.read().decode().splitlines()[1:]
    rows = [line.split("\t") for line in lines if line][-n:]
    assert all(len(r) == len(columns) for r in rows), "raw lines are not 40 tab-separated columns"
    return columns, rows


# ---------------------------------------------------------------------------------------------------------------
# Timing


def summarise(lat_ns: list[int], rows: int, wall_s: float, ok: int, errors: int) -> dict[str, Any]:
    lat = np.asarray(lat_ns, np.float64) / 1e6
    return {"requests": ok + errors, "ok": ok, "errors": errors, "seconds": wall_s,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "mean_ms": float(lat.mean()) if len(lat) else None,
            "max_ms": float(lat.max()) if len(lat) else None,
            "rows_per_s": ok * rows / wall_s if wall_s > 0 else None}


def time_calls(fn: Callable[[int], Any], count: int, seconds: float) -> tuple[list[int], float]:
    """Call fn(i) until `count` calls or `seconds` elapse (at least one call); per-call ns and wall seconds."""
    lat: list[int] = []
    start = time.perf_counter()
    deadline = time.perf_counter_ns() + int(seconds * 1e9)
    for i in range(max(1, count)):
        t0 = time.perf_counter_ns()
        fn(i)
        t1 = time.perf_counter_ns()
        lat.append(t1 - t0)
        if t1 >= deadline:
            break
    return lat, time.perf_counter() - start


class Http:
    """One endpoint of one server: pre-encoded payloads per size, and a closed-loop load generator."""

    def __init__(self, port: int, path: str, payloads: dict[int, list[bytes]], parse: Callable[[dict], list],
                 content_type: str = "application/json"):
        self.port, self.path, self.payloads, self.parse = port, path, payloads, parse
        self.content_type = content_type
        self.answered = 0  # 200 responses with the right number of predictions (all cells)

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def post(self, conn: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
        conn.request("POST", self.path, body, {"Content-Type": self.content_type})
        resp = conn.getresponse()
        return resp.status, resp.read()

    def predictions(self, body: bytes) -> list:
        return self.parse(json.loads(body))

    def load(self, rows: int, concurrency: int, count: int, seconds: float) -> dict[str, Any]:
        """Closed loop: `concurrency` threads, each with its own connection, sending one request after another
        until `count` requests in all or `seconds` have passed."""
        payloads = self.payloads[rows]
        lock = threading.Lock()
        issued = [0]
        lat: list[int] = []
        ok, errors = [0], [0]
        first_error: list[str] = []
        deadline = time.perf_counter() + seconds

        def worker(k: int) -> None:
            conn = self.connect()
            try:
                while True:
                    with lock:
                        if issued[0] >= count or (issued[0] > 0 and time.perf_counter() >= deadline):
                            return
                        i = issued[0]
                        issued[0] += 1
                    t0 = time.perf_counter_ns()
                    try:
                        status, body = self.post(conn, payloads[(i + k) % len(payloads)])
                    except (OSError, http.client.HTTPException) as e:
                        conn.close()
                        conn = self.connect()
                        status, body = -1, repr(e).encode()
                    t1 = time.perf_counter_ns()
                    try:
                        good = status == 200 and len(self.predictions(body)) == rows
                    except (ValueError, KeyError, IndexError, TypeError):
                        good = False
                    with lock:
                        if good:
                            lat.append(t1 - t0)
                            ok[0] += 1
                        else:
                            errors[0] += 1
                            if not first_error:
                                first_error.append(f"{status}: {body[:300].decode(errors='replace')}")
            finally:
                conn.close()

        start = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=seconds + 120)
        wall = time.perf_counter() - start
        self.answered += ok[0]
        out = summarise(lat, rows, wall, ok[0], errors[0])
        out["_lat"] = lat  # for merge(); not in the JSON
        if first_error:
            out["first_error"] = first_error[0]
        return out


def merge(parts: list[dict[str, Any]], lat_parts: list[list[int]], rows: int) -> dict[str, Any]:
    lat = [x for part in lat_parts for x in part]
    out = summarise(lat, rows, sum(p["seconds"] for p in parts), sum(p["ok"] for p in parts),
                    sum(p["errors"] for p in parts))
    errs = [p["first_error"] for p in parts if "first_error" in p]
    if errs:
        out["first_error"] = errs[0]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process in its own session (so that stop() reaches the uvicorn child `mlflow models serve`
    starts), stopped by its PID's process group."""

    def __init__(self, kind: str, model: str, env: dict, work: Path):
        self.kind, self.model, self.port = kind, model, free_port()
        uri = f"models:/{NAMES[model]}@{ALIAS}"
        if kind == "mlflow":
            cmd = [str(Path(VENV_BIN) / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
                   "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
            self.ready_path = "/ping"
        else:
            cmd = [PY, "-m", "deeplight.cli", "serve", "--model", uri, "--host", "127.0.0.1", "--port",
                   str(self.port), "--name", KSERVE_NAME, "--threads", "1"]
            self.ready_path = "/v2/health/ready"
        self.log = work / f"server-{kind}-{model}.log"
        self.log_file = open(self.log, "wb")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=env, cwd=work, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.ready_s: float | None = None

    def wait_ready(self, timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.kind} server for {self.model} exited ({self.proc.returncode}):\n"
                                 f"{self.log.read_text(errors='replace')[-3000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", self.ready_path)
                if conn.getresponse().status == 200:
                    self.ready_s = time.perf_counter() - self.started
                    conn.close()
                    return
                conn.close()
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.25)
        raise SystemExit(f"{self.kind} server for {self.model} not ready in {timeout} s:\n"
                         f"{self.log.read_text(errors='replace')[-3000:]}")

    def stop(self) -> bool:
        """SIGTERM to the server's process group (led by our child's PID), SIGKILL after 10 s; True if gone."""
        pid = self.proc.pid
        if self.proc.poll() is None:
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(pid, signal.SIGKILL)  # leftovers of the group (uvicorn children)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        self.log_file.close()
        return self.proc.poll() is not None


def mlflow_payload(columns: list[str], rows: list[list[Any]]) -> bytes:
    return json.dumps({"dataframe_split": {"columns": columns, "data": rows}}).encode()


def mlflow_records_payload(records: list[dict]) -> bytes:
    return json.dumps({"dataframe_records": records}).encode()


def v1_payload(records: list[dict]) -> bytes:
    return json.dumps({"instances": records}).encode()


def v2_payload(cols: dict[str, list]) -> bytes:
    return json.dumps({"inputs": [{"name": k, "datatype": "BYTES", "shape": [len(v)], "data": v}
                                  for k, v in cols.items()]}).encode()


def tsv_payload(columns: list[str], rows: list[list[str]], header: bool = False) -> bytes:
    """The rows as lines of the dataset's file (tab-separated; the feature columns in file order need no header)."""
    return "\n".join(["\t".join(columns)] * header + ["\t".join(r) for r in rows]).encode()


def parse_mlflow(obj: dict) -> list:
    return obj["predictions"]


def parse_v1(obj: dict) -> list:
    return obj["predictions"]


def parse_v2(obj: dict) -> list:
    return obj["outputs"][0]["data"]


def encode(endpoint: str, columns: list[str], rows: list[list[str]]) -> bytes:
    if endpoint == "mlflow":
        return mlflow_payload(columns, rows)
    if endpoint == "kserve-v1":
        return v1_payload([dict(zip(columns, r)) for r in rows])
    if endpoint == "kserve-tsv":
        return tsv_payload(columns, rows)
    return v2_payload({c: [r[j] for r in rows] for j, c in enumerate(columns)})


# ---------------------------------------------------------------------------------------------------------------
# Malformed requests


def malformed_cases(columns: list[str], rows: list[list[str]]) -> dict[str, dict[str, Any]]:
    """Three records; record 1 is bad. Per case: the bad field (to look for in the body) and the records (label
    included: 'yes' is a bad label); `ragged` marks the record that lacks a field."""
    base = [dict(zip(columns, r)) for r in rows[:3]]

    def with_(fn: Callable[[dict], None]) -> list[dict]:
        recs = [dict(r) for r in base]
        fn(recs[1])
        return recs

    def misspell(r: dict) -> None:
        r["C55"] = r.pop("C5")

    renamed = [dict(r) for r in base]
    for r in renamed:
        misspell(r)
    return {
        "missing field in one record": {"field": "C5", "records": with_(lambda r: r.pop("C5"))},
        "misspelt key (C5 -> C55)": {"field": "C55|C5", "records": with_(misspell), "columns": renamed},
        "non-integer in I5": {"field": "I5", "records": with_(lambda r: r.__setitem__("I5", "abc"))},
        "label 'yes'": {"field": "label", "records": with_(lambda r: r.__setitem__("label", "yes"))},
    }


def malformed_body(fmt: str, spec: dict[str, Any]) -> bytes:
    """Each server's natural form of the records. A record lacking a field: in dataframe_split a row one value
    short; in v2 that column's tensor one value short. A misspelt key: in the column-wise formats (split, v2),
    the whole column is named C55."""
    records = spec["records"]
    if fmt == "mlflow-records":
        return mlflow_records_payload(records)
    if fmt == "kserve-v1":
        return v1_payload(records)
    if fmt == "kserve-tsv":  # a header line (the first record's keys), then each record's values: one line short
        cols = list(spec.get("columns", records)[0])
        return tsv_payload(cols, [[r[c] for c in cols if c in r] for r in spec.get("columns", records)], True)
    records = spec.get("columns", records)
    cols = list(dict.fromkeys(k for r in records for k in r))
    if fmt == "mlflow-split":
        data = [[r[c] for c in cols if c in r] for r in records]
        return mlflow_payload(cols, data)
    # v2: one tensor per column, only the values present
    return v2_payload({c: [r[c] for r in records if c in r] for c in cols})


def judge(status: int | str, text: str, field: str) -> dict[str, Any]:
    return {"status": status, "body": text[:400],
            "names_row": bool(re.search(r"\brow 1\b", text)),
            "names_field": bool(re.search(rf"field ['\"]({field})['\"]", text)),
            "scored": status == 200}


# ---------------------------------------------------------------------------------------------------------------
# Main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000, help="rows of synthetic training data")
    ap.add_argument("--work", default=None, help="scratch dir: data, models, MLflow store (default: a temp dir); "
                                                 "models already built there are reused")
    ap.add_argument("--requests", type=int, default=2000, help="most calls per cell")
    ap.add_argument("--seconds", type=float, default=2.0, help="most seconds per cell")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per cell, alternating dense and pruned")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run, not numbers to record)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "out" / "serving.json"))
    a = ap.parse_args()
    if a.quick:
        a.rows, a.requests, a.seconds, a.rounds = min(a.rows, 4000), min(a.requests, 12), min(a.seconds, 0.3), 1
    work = Path(a.work or tempfile.mkdtemp(prefix="deeplight-serving-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    env = {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "DEEPLIGHT_ENGINE_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    os.environ["DEEPLIGHT_ENGINE_THREADS"] = "1"
    sys.path.insert(0, str(REPO))
    nproc = os.cpu_count() or 1

    with LoadSampler() as load:
        load.set_phase("build")
        t_build = time.perf_counter()
        built = build_models(work, a.rows, a.quick, env)
        build_s = time.perf_counter() - t_build
        load.set_phase("setup")

        import mlflow
        import pandas as pd
        from threadpoolctl import threadpool_info

        columns, rows = raw_records(built["raw"], max(SIZES) * 4 if not a.quick else max(SIZES) + 16)
        features = columns[1:]  # timed requests: no label
        frows = [r[1:] for r in rows]
        n_pool = len(frows)
        n_payloads = 4 if a.quick else 8

        def offsets(size: int) -> list[int]:
            return [rng.randrange(0, n_pool - size + 1) for _ in range(n_payloads)]

        offs = {size: offsets(size) for size in SIZES}
        frames = {size: [pd.DataFrame([frows[o + j] for j in range(size)], columns=features) for o in offs[size]]
                  for size in SIZES}

        # in-process models
        pyfuncs, versions = {}, {}
        for model in MODELS:
            uri = f"models:/{NAMES[model]}@{ALIAS}"
            pyfuncs[model] = mlflow.pyfunc.load_model(uri)
            versions[model] = built["registered"][model]["version"]
        scorers = {m: pyfuncs[m].unwrap_python_model().scorer for m in MODELS}
        engines = {m: scorers[m].compact for m in MODELS}
        id_pool = {m: scorers[m].ids(pd.DataFrame(frows, columns=features)) for m in MODELS}
        for m in MODELS:  # warm-up (numba dispatch, first-call allocations)
            for size in SIZES:
                pyfuncs[m].predict(frames[size][0])
                engines[m].score(id_pool[m][:size])

        # servers
        servers: dict[tuple[str, str], Server] = {}
        busy: list[subprocess.Popen] = []
        result: dict[str, Any] = {}
        try:
            for kind in ("mlflow", "kserve"):
                for model in MODELS:
                    servers[(kind, model)] = Server(kind, model, env, work)
            for s in servers.values():
                s.wait_ready(300)
            endpoints: dict[tuple[str, str], Http] = {}
            for model in MODELS:
                for ep in ENDPOINTS:
                    srv = servers[("mlflow" if ep == "mlflow" else "kserve", model)]
                    path = {"mlflow": "/invocations", "kserve-v2": f"/v2/models/{KSERVE_NAME}/infer"}.get(
                        ep, f"/v1/models/{KSERVE_NAME}:predict")
                    parse = {"mlflow": parse_mlflow, "kserve-v2": parse_v2}.get(ep, parse_v1)
                    payloads = {size: [encode(ep, features, frows[o:o + size]) for o in offs[size]]
                                for size in SIZES}
                    endpoints[(ep, model)] = Http(srv.port, path, payloads, parse,
                                                  TSV if ep == "kserve-tsv" else "application/json")

            # parity: 100 rows through every server vs the in-process pyfunc
            parity = []
            check = frows[:100]
            for (ep, model), h in endpoints.items():
                want = np.asarray(pyfuncs[model].predict(pd.DataFrame(check, columns=features)), np.float64)
                conn = h.connect()
                status, body = h.post(conn, encode(ep, features, check))
                conn.close()
                got = np.asarray(h.predictions(body), np.float64) if status == 200 else np.zeros(0)
                if status == 200:
                    h.answered += 1
                diff = float(np.abs(got - want).max()) if got.shape == want.shape else None
                parity.append({"endpoint": ep, "model": model, "rows": len(check), "status": status,
                               "max_abs_diff": diff})

            # malformed requests (pruned model's servers; the in-process pyfunc too)
            malformed = []
            for case, spec in malformed_cases(columns, rows).items():
                for fmt in ("pyfunc", "mlflow-split", "mlflow-records", "kserve-v1", "kserve-v2", "kserve-tsv"):
                    if fmt == "pyfunc":
                        try:
                            out = pyfuncs["pruned"].predict(pd.DataFrame.from_records(spec["records"]))
                            status, text = 200, f"scored: {list(np.round(out, 4))}"
                        except Exception as e:  # noqa: BLE001 - what the caller would see
                            status, text = type(e).__name__, str(e)
                    else:
                        ep = "mlflow" if fmt.startswith("mlflow") else fmt
                        h = endpoints[(ep, "pruned")]
                        conn = h.connect()
                        try:
                            status, body = h.post(conn, malformed_body(fmt, spec))
                        finally:
                            conn.close()
                        text = body.decode(errors="replace")
                    malformed.append({"case": case, "endpoint": fmt, **judge(status, text, spec["field"])})

            cells: list[dict[str, Any]] = []

            def measure(cond: str) -> None:
                n, s, rounds = a.requests, a.seconds, a.rounds
                # engine on ids, then the in-process pyfunc on raw rows
                for kind in ("engine", "scorer", "pyfunc"):
                    for size in SIZES:
                        parts: dict[str, list] = {m: [] for m in MODELS}
                        for _ in range(rounds):
                            for m in rng.sample(MODELS, len(MODELS)):
                                if kind == "engine":
                                    eng, pool = engines[m], id_pool[m]
                                    starts = [rng.randrange(0, n_pool - size + 1) for _ in range(64)]
                                    fn = (lambda i, eng=eng, pool=pool, starts=starts, size=size:
                                          eng.score(pool[starts[i % 64]:starts[i % 64] + size]))
                                else:
                                    call = scorers[m].score if kind == "scorer" else pyfuncs[m].predict
                                    fr = frames[size]
                                    fn = lambda i, call=call, fr=fr: call(fr[i % len(fr)])  # noqa: E731
                                parts[m].append(time_calls(fn, n // rounds, s / rounds))
                        for m in MODELS:
                            lat = [x for p in parts[m] for x in p[0]]
                            wall = sum(p[1] for p in parts[m])
                            cells.append({"cond": cond, "path": kind, "model": m, "rows": size, "concurrency": 1,
                                          **summarise(lat, size, wall, len(lat), 0)})
                for ep in ENDPOINTS:
                    for size in SIZES:
                        for conc in CONCURRENCY:
                            parts = {m: [] for m in MODELS}
                            for _ in range(rounds):
                                for m in rng.sample(MODELS, len(MODELS)):
                                    parts[m].append(endpoints[(ep, m)].load(size, conc, n // rounds, s / rounds))
                            for m in MODELS:
                                ps = parts[m]
                                cells.append({"cond": cond, "path": ep, "model": m, "rows": size,
                                              "concurrency": conc, **merge(ps, [p.pop("_lat", []) for p in ps],
                                                                            size)})

            load.set_phase("quiet")
            t = time.perf_counter()
            measure("quiet")
            quiet_s = time.perf_counter() - t

            # oversubscribed 2x: 2 x nproc runnable threads on nproc cores, counting the timed one: 2 x nproc - 1
            # busy loops, bounded to ~3x the quiet phase's time (+ 60 s). (Until the ninth session: 2 x nproc
            # loops, 2.5x on 2 cores, where a fair scheduler alone makes a long job 2.5x slower.)
            load.set_phase("oversubscribed")
            bound = 3 * quiet_s + 60
            busy = [subprocess.Popen([PY, "-c", BUSY_LOOP, str(bound)]) for _ in range(2 * nproc - 1)]
            time.sleep(1.0)  # let the scheduler see them
            t = time.perf_counter()
            measure("oversubscribed")
            oversub_s = time.perf_counter() - t
            busy_alive_at_end = sum(p.poll() is None for p in busy)
        finally:
            busy_pids = [p.pid for p in busy]
            for p in busy:
                if p.poll() is None:
                    p.kill()
            for p in busy:
                p.wait(timeout=10)
            load.set_phase("teardown")
            stopped = {f"{k}/{m}": s.stop() for (k, m), s in servers.items()}

    result = {
        "config": {"rows": a.rows, "requests": a.requests, "seconds": a.seconds, "rounds": a.rounds,
                   "quick": a.quick, "sizes": list(SIZES), "concurrency": list(CONCURRENCY), "work": str(work),
                   "command": " ".join([Path(PY).name, *sys.argv])},
        "machine": {"nproc": nproc, "platform": platform.platform(), "python": platform.python_version()},
        "threads": {"env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                           "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
                                                           "DEEPLIGHT_ENGINE_THREADS")},
                    "engine_blas": {m: scorers[m].blas for m in MODELS},
                    "threadpools": [{k: d.get(k) for k in ("user_api", "internal_api", "num_threads", "filepath")}
                                    for d in threadpool_info()]},
        "models": {m: {"uri": f"models:/{NAMES[m]}@{ALIAS}", "version": versions[m]} for m in MODELS},
        "build_s": round(build_s, 1), "quiet_s": round(quiet_s, 1), "oversubscribed_s": round(oversub_s, 1),
        "servers": [{"server": k, "model": m, "port": s.port, "pid": s.proc.pid, "ready_s": round(s.ready_s or 0, 2),
                     "stopped": stopped[f"{k}/{m}"]} for (k, m), s in servers.items()],
        "answered": [{"endpoint": ep, "model": m, "responses": h.answered} for (ep, m), h in endpoints.items()],
        "oversubscription": {"processes": len(busy_pids), "pids": busy_pids, "bound_s": round(bound, 1),
                             "alive_at_end_of_phase": busy_alive_at_end,
                             "all_stopped": all(p.poll() is not None for p in busy)},
        "loadavg": {"by_phase": load.by_phase(), "samples": load.samples},
        "parity": parity, "malformed": malformed, "cells": cells,
    }
    result["goals"] = goals(cells)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2, default=str))
    print(markdown(result))


def cell(cells: list[dict], cond: str, path: str, model: str, rows: int, conc: int = 1) -> dict[str, Any]:
    for c in cells:
        if (c["cond"], c["path"], c["model"], c["rows"], c["concurrency"]) == (cond, path, model, rows, conc):
            return c
    raise KeyError((cond, path, model, rows, conc))


def goals(cells: list[dict]) -> list[dict[str, Any]]:
    out = []

    def goal(name: str, value: float | None, target: float, at_most: bool) -> None:
        met = None if value is None else (value <= target if at_most else value >= target)
        out.append({"goal": name, "value": value, "target": target, "at_most": at_most, "met": met})

    q = "quiet"
    goal("in-process pyfunc, pruned, 1 raw row: p50 ms", cell(cells, q, "pyfunc", "pruned", 1)["p50_ms"],
         GOALS["inproc_1row_ms"], True)
    goal("in-process pyfunc, pruned, 1,000 rows: rows/s", cell(cells, q, "pyfunc", "pruned", 1000)["rows_per_s"],
         GOALS["inproc_1000_rows_per_s"], False)
    for ep in ENDPOINTS:
        goal(f"{ep}, pruned, 1 row, conc 1: p50 ms", cell(cells, q, ep, "pruned", 1)["p50_ms"],
             GOALS["http_p50_1row_ms"], True)
        goal(f"{ep}, pruned, 1,000 rows, conc 1: p50 ms", cell(cells, q, ep, "pruned", 1000)["p50_ms"],
             GOALS["http_p50_1000_ms"], True)
        for size in SIZES:
            c = cell(cells, q, ep, "pruned", size)
            goal(f"{ep}, pruned, {size:,} rows, conc 1: p99 / p50",
                 c["p99_ms"] / c["p50_ms"] if c["p50_ms"] else None, GOALS["http_p99_over_p50"], True)
        for conc in CONCURRENCY:
            d, p = cell(cells, q, ep, "dense", 1000, conc), cell(cells, q, ep, "pruned", 1000, conc)
            goal(f"{ep}, 1,000 rows, conc {conc}: pruned / dense rows/s",
                 p["rows_per_s"] / d["rows_per_s"] if d["rows_per_s"] else None,
                 GOALS["http_pruned_over_dense_1000"], False)
    for m in MODELS:
        for size in SIZES:
            qc, oc = cell(cells, q, "engine", m, size), cell(cells, "oversubscribed", "engine", m, size)
            goal(f"engine, {m}, batch {size:,}: oversubscribed / quiet p50", oc["p50_ms"] / qc["p50_ms"],
                 GOALS["oversub_engine_ratio"], True)
    return out


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _diff(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def markdown(r: dict[str, Any]) -> str:
    cells = r["cells"]
    lines = [f"\n`{r['config']['command']}`  ({r['machine']['nproc']} cores; cells bounded by "
             f"{r['config']['requests']} calls / {r['config']['seconds']} s in {r['config']['rounds']} rounds)\n"]
    la = r["loadavg"]["by_phase"]
    lines.append("Load average (1 min) by phase: " + "; ".join(
        f"{ph} {v['load1_min']:.2f}-{v['load1_max']:.2f}" for ph, v in la.items()) + "\n")
    lines.append("| path | model | rows/req | conc | p50 ms | p99 ms | rows/s | pruned/dense rows/s | "
                 "oversub p50 ms | oversub p99 ms | oversub rows/s | calls (quiet/oversub) |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    order = ("engine", "scorer", "pyfunc", *ENDPOINTS)
    for path in order:
        for size in SIZES:
            for conc in CONCURRENCY:
                for m in MODELS:
                    try:
                        q = cell(cells, "quiet", path, m, size, conc)
                        o = cell(cells, "oversubscribed", path, m, size, conc)
                    except KeyError:
                        continue
                    ratio = "-"
                    if m == "pruned":
                        d = cell(cells, "quiet", path, "dense", size, conc)
                        if d["rows_per_s"]:
                            ratio = f"{q['rows_per_s'] / d['rows_per_s']:.2f}x"
                    errs = "" if not (q["errors"] or o["errors"]) else f" ({q['errors']}+{o['errors']} errors)"
                    lines.append(f"| {path} | {m} | {size:,} | {conc} | {_ms(q['p50_ms'])} | {_ms(q['p99_ms'])} | "
                                 f"{_rate(q['rows_per_s'])} | {ratio} | {_ms(o['p50_ms'])} | {_ms(o['p99_ms'])} | "
                                 f"{_rate(o['rows_per_s'])} | {q['ok']}/{o['ok']}{errs} |")
    lines.append("\n| goal | measured | target | met |\n|---|---|---|---|")
    for g in r["goals"]:
        v = g["value"]
        shown = "-" if v is None else f"{v:,.0f}" if v >= 1000 else f"{v:.3f}"
        lines.append(f"| {g['goal']} | {shown} | {'<=' if g['at_most'] else '>='} {g['target']:,} | "
                     f"{'-' if g['met'] is None else 'yes' if g['met'] else '**no**'} |")
    lines.append("\nParity with the in-process pyfunc (100 rows): " + "; ".join(
        f"{p['endpoint']}/{p['model']} {p['status']} max |diff| "
        f"{_diff(p['max_abs_diff'])}" for p in r["parity"]))
    lines.append("\nMalformed requests (pruned model; bad record is row 1 of 3):\n")
    lines.append("| case | endpoint | status | names row | names field | body |\n|---|---|---|---|---|---|")
    for m in r["malformed"]:
        body = m["body"].replace("|", "\\|").replace("\n", " ")[:160]
        lines.append(f"| {m['case']} | {m['endpoint']} | {m['status']}{' **scored**' if m['scored'] else ''} | "
                     f"{'yes' if m['names_row'] else 'no'} | {'yes' if m['names_field'] else 'no'} | {body} |")
    o = r["oversubscription"]
    lines.append(f"\nOversubscription: {o['processes']} busy-loop processes (2 x nproc - 1), bound {o['bound_s']} s, "
                 f"all stopped: {o['all_stopped']}. Servers: " + ", ".join(
                     f"{s['server']}/{s['model']} ready in {s['ready_s']} s" for s in r["servers"]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
