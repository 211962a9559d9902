"""All MLflow tracking code: where runs go, how they are opened, resumed and nested.

Default store: `sqlite:///<cwd>/mlruns/mlflow.db` with artifacts under `<cwd>/mlruns/artifacts` (the embedded
default, what `make ui` shows). `MLFLOW_TRACKING_URI` overrides it (a remote `mlflow server`; S3 artifacts via
`MLFLOW_S3_ENDPOINT_URL`). Credentials never reach params, tags or logs: values are passed through `redact`.
Give a server's credentials as MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, not in the URI; a URI with
`user:password@` works but is cleaned before MLflow sees it, so neither MLflow nor deeplight prints them.

    tracker = MlflowTracker(experiment="deeplight")
    with tracker.run("train") as log:
        log.log_params({"train.epochs": 3}); log.log_metrics({"valid_auc": 0.8}, step=0)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote, urlsplit, urlunsplit

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from deeplight.base.redact import redact

DEFAULT_EXPERIMENT = "deeplight"
PARENT_TAG = "mlflow.parentRunId"
_SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|access_key)", re.IGNORECASE)


def mlruns_dir() -> Path:
    return Path(os.environ.get("DEEPLIGHT_MLRUNS", Path.cwd() / "mlruns")).absolute()


def _credentials_out_of_uri(uri: str) -> str:
    """`uri` without `user:password@`, the pair moved to MLFLOW_TRACKING_USERNAME / _PASSWORD (the same HTTP basic
    auth). MLflow prints its tracking URI ("View run ... at: URL" when a run ends) and puts it in error messages;
    a URI without credentials cannot leak them. The cleaned URI replaces MLFLOW_TRACKING_URI so that MLflow's
    own lookups and the pipeline's step processes see it too. Credentials already in the environment win (as in
    MLflow). A user without a password cannot move: that URI is kept, and MLflow told not to print it."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    env_creds = os.environ.get("MLFLOW_TRACKING_USERNAME") and os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if not env_creds:
        if not (user and password):
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
            return uri
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(user)
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
    clean = urlunsplit(parts._replace(netloc=host))
    if os.environ.get("MLFLOW_TRACKING_URI") == uri:
        os.environ["MLFLOW_TRACKING_URI"] = clean
    return clean


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set (credentials in it moved to the environment: `_credentials_out_of_uri`),
    else the embedded sqlite store under ./mlruns."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return _credentials_out_of_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlruns_dir().mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{mlruns_dir() / 'mlflow.db'}"


def _safe_items(d: dict[str, Any]) -> list[tuple[str, str]]:
    return [(k, "***" if _SECRET_KEY.search(k) else redact(v)) for k, v in d.items()]


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """For a sqlite store, an exclusive flock on `<db>.lock` beside the database file. MLflow creates (migrates)
    a new database's schema when a client first opens it, and two processes doing so at once fail (`table
    _alembic_tmp_runs already exists`): under this lock the first creates it and the others find it made."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    if not str(db) or str(db) == ":memory:":
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when closed
        yield


def client() -> MlflowClient:
    """A client of the tracking store; the store (its schema, for a new sqlite file) is created under a lock."""
    uri = tracking_uri()
    with _store_lock(uri):
        return MlflowClient(tracking_uri=uri)  # opens the store: MLflow creates a new database's schema here


def experiment_id(c: MlflowClient, name: str = DEFAULT_EXPERIMENT) -> str:
    """The experiment's id, created on first use (artifacts under mlruns/ for the embedded store)."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        location = (mlruns_dir() / "artifacts").as_uri()
    return c.create_experiment(name, artifact_location=location)


class MlflowRunLog:
    """One open MLflow run (see `deeplight.base.tracker.RunLog`)."""

    def __init__(self, c: MlflowClient, run_id: str):
        self.client, self.run_id = c, run_id

    def log_params(self, params: dict[str, Any]) -> None:
        items = _safe_items(params)
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i:i + 100]])

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in _safe_items(tags)])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)


class MlflowTracker:
    """Opens runs in one experiment; with `parent_run_id` every run is a child of that run."""

    def __init__(self, experiment: str = DEFAULT_EXPERIMENT, parent_run_id: str | None = None):
        self.client = client()
        self.experiment_id = experiment_id(self.client, experiment)
        self.parent_run_id = parent_run_id

    @contextlib.contextmanager
    def run(self, name: str, resume_id: str | None = None, tags: dict[str, Any] | None = None
            ) -> Iterator[MlflowRunLog]:
        if resume_id:
            self.client.update_run(resume_id, status="RUNNING")
            run_id = resume_id
        else:
            all_tags = dict(tags or {})
            if self.parent_run_id:
                all_tags[PARENT_TAG] = self.parent_run_id
            run = self.client.create_run(self.experiment_id, run_name=name,
                                         tags={k: v for k, v in _safe_items(all_tags)})
            run_id = run.info.run_id
        try:
            yield MlflowRunLog(self.client, run_id)
        except BaseException:
            self.client.set_terminated(run_id, status="FAILED")
            raise
        self.client.set_terminated(run_id, status="FINISHED")
