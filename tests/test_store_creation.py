"""Two processes opening one fresh sqlite MLflow store at the same moment both succeed (issue 18, item 11):
MLflow's schema migration on a new database is not safe to run twice at once (`table _alembic_tmp_runs already
exists`), so deeplight creates the store under a lock beside the database file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

# A deeplight process that, for each sqlite URI it reads, opens the store and logs one run as soon as it reads
# the URI: two of them given the same fresh URI at once race on creating it.
CHILD = """
import os, sys, traceback
from deeplight.ops.tracking import MlflowTracker
print("ready", flush=True)
for line in sys.stdin:
    os.environ["MLFLOW_TRACKING_URI"] = line.strip()
    try:
        with MlflowTracker().run("side-by-side") as log:
            log.log_metrics({"x": 1.0})
        print("ok", flush=True)
    except BaseException:
        print("failed: " + traceback.format_exc().replace(chr(10), " | "), flush=True)
"""


def test_two_processes_on_a_fresh_sqlite_store_both_succeed(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"MLFLOW_DISABLE_TELEMETRY": "true"}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env, cwd=tmp_path) for _ in range(2)]
    try:
        assert [p.stdout.readline() for p in procs] == ["ready\n"] * 2
        for rep in range(2):  # a new store takes MLflow ~5 s to create; the race failed on the first before the lock
            uri = f"sqlite:///{tmp_path / f'store{rep}' / 'mlflow.db'}"
            for p in procs:  # both start on the fresh store together
                p.stdin.write(uri + "\n")
                p.stdin.flush()
            assert [p.stdout.readline() for p in procs] == ["ok\n"] * 2, rep
            c = MlflowClient(uri)
            runs = c.search_runs([c.get_experiment_by_name("deeplight").experiment_id])
            assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(60)
            p.stdout.close()
