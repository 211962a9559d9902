"""All MLflow tracking code: where runs go, how they are opened, resumed and nested.

Default store: `sqlite:///<cwd>/mlruns/mlflow.db` with artifacts under `<cwd>/mlruns/artifacts` (the embedded
default, what `make ui` shows). `MLFLOW_TRACKING_URI` overrides it (a remote `mlflow server`; S3 artifacts via
`MLFLOW_S3_ENDPOINT_URL`). Credentials never reach params, tags or logs: values are passed through `redact`.
Give a server's credentials as MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, not in the URI; a URI with
`user:password@` works but is cleaned before MLflow sees it, so neither MLflow nor deeplight prints them.

What makes runs comparable in the UI: every run deeplight creates (through `client()`) carries MLflow's standard
tags (`mlflow.user`, `mlflow.source.name`/`type`, `mlflow.source.git.commit` in a git checkout); the experiment
is typed `mlflow.experimentKind=custom_model_development` (the UI's model-training view, not GenAI); a tracker
given the hashed dataset logs its splits as MLflow dataset inputs (digest: the split's fingerprint) and, with
`system_metrics`, samples MLflow's own system metrics (CPU, memory, disk, network) every
`SYSTEM_METRICS_SECONDS`; `run_label` names runs after what they hold (dataset, model, sparsity targets, date).

    tracker = MlflowTracker(experiment="deeplight")
    with tracker.run("train") as log:
        log.log_params({"train.epochs": 3}); log.log_metrics({"valid_auc": 0.8}, step=0)
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import getpass
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote, urlsplit, urlunsplit

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from deeplight.base.redact import redact

DEFAULT_EXPERIMENT = "deeplight"
PARENT_TAG = "mlflow.parentRunId"
# The MLflow UI opens an experiment by this tag: without it MLflow 3 guesses, and showed ours in its GenAI view.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# MLflow's default sampling interval. A sample costs ~27 ms of CPU (psutil ~0.5 ms, MLflow's run lookup and the
# write to a sqlite store; measured on 2 loaded cores), so 0.3% of one core at 10 s (3% at 1 s); a 30 s step still
# gets a few points, a shorter one one sample at its end.
SYSTEM_METRICS_SECONDS = 10.0
SPLITS = ("train", "valid", "test")
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


# --- standard tags and names ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the git checkout deeplight runs from; None elsewhere (an installed wheel, the image)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out if re.fullmatch(r"[0-9a-f]{40}", out) else None


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container uid without a passwd entry
        return os.environ.get("USER") or "unknown"


def source_name(argv: list[str] | None = None) -> tuple[str, str]:
    """(mlflow.source.name, mlflow.source.type) of this process: `deeplight train` from the CLI (LOCAL), the
    component's function in a KFP step (`deeplight component train`, JOB), else the script."""
    argv = list(sys.argv if argv is None else argv)
    if "--function_to_execute" in argv[:-1]:  # KFP's executor_main runs a component
        return f"deeplight component {argv[argv.index('--function_to_execute') + 1]}", "JOB"
    if argv and Path(argv[0]).name == "deeplight":
        words = [w for w in argv[1:3] if not w.startswith("-")][:2]
        if words and words[0] != "pipeline":
            words = words[:1]
        return " ".join(["deeplight", *words]), "LOCAL"
    if not argv or argv[0] in ("", "-c", "-"):
        return "python", "LOCAL"
    return Path(argv[0]).name, "LOCAL"


def standard_tags() -> dict[str, str]:
    """MLflow's own run tags (what its fluent `start_run` sets and its UI shows as Created by, Source, Version)."""
    name, kind = source_name()
    tags = {"mlflow.user": _user(), "mlflow.source.name": name, "mlflow.source.type": kind}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _percent(value: float) -> str:
    return f"{round(float(value) * 100, 2):g}".replace(".", "p")  # MLflow model names may not hold a dot


def sparsity_label(prune: Any) -> str:
    """`dnn90-field90-emb40` (+ `-structured`): a pruning config's targets (`PruneConfig` or a dict)."""
    get = prune.get if isinstance(prune, dict) else lambda k, d=None: getattr(prune, k, d)
    label = f"dnn{_percent(get('dnn', 0))}-field{_percent(get('field', 0))}-emb{_percent(get('embedding', 0))}"
    return label + ("-structured" if get("mode") == "structured" else "")


def model_label(dataset: str, kind: str, prune: Any = None) -> str:
    """What a model is: `criteo-deepfwfm-dense`, `criteo-deepfwfm-dnn90-field90-emb40` (pruned: its targets)."""
    return "-".join(p for p in (dataset, kind, sparsity_label(prune) if prune else "dense") if p)


def run_label(*parts: Any, when: float | None = None, suffix: str = "") -> str:
    """A run name from what the run holds, then the local date and minute: `run_label("train", "criteo",
    "deepfwfm")` -> `train-criteo-deepfwfm-20261206-2253`. Empty parts are left out."""
    stamp = time.strftime("%Y%m%d-%H%M", time.localtime(when))
    return "-".join(str(p) for p in (*parts, stamp, suffix) if p not in (None, ""))


class Client(MlflowClient):
    """An MlflowClient whose new runs carry MLflow's standard tags (`standard_tags`; given tags win)."""

    def create_run(self, experiment_id: str, start_time: int | None = None, tags: dict[str, Any] | None = None,
                   run_name: str | None = None) -> Any:
        return super().create_run(experiment_id, start_time=start_time, tags={**standard_tags(), **(tags or {})},
                                  run_name=run_name)


def client() -> Client:
    """A client of the tracking store; the store (its schema, for a new sqlite file) is created under a lock."""
    uri = tracking_uri()
    with _store_lock(uri):
        return Client(tracking_uri=uri)  # opens the store: MLflow creates a new database's schema here


def experiment_id(c: MlflowClient, name: str = DEFAULT_EXPERIMENT) -> str:
    """The experiment's id, created on first use (artifacts under mlruns/ for the embedded store) and typed for
    the UI's model-training view (an experiment made before deeplight typed it gets the tag now)."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND_TAG) is None:
            c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        location = (mlruns_dir() / "artifacts").as_uri()
    return c.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def ui_url(experiment: str, base: str | None = None) -> str:
    """The runs page of an experiment in the MLflow UI, in its model-training view. MLflow 3.17's UI chooses the
    view by a per-browser toggle (GenAI | Model training, GenAI by default) and then ignores the experiment's
    `mlflow.experimentKind`; `workflowType=machine_learning` in the URL selects the model-training view. `base`:
    the UI (default: the tracking server, else `make ui`'s http://127.0.0.1:5000)."""
    if base is None:
        uri = redact(tracking_uri())
        base = uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base.rstrip('/')}/#/experiments/{experiment}/runs?workflowType=machine_learning"


# --- dataset inputs ----------------------------------------------------------------------------------------

def split_datasets(data_dir: str | Path, splits: tuple[str, ...] = SPLITS, source: str | None = None
                   ) -> list[DatasetInput]:
    """The splits of a hashed dataset as MLflow dataset inputs: name `<dataset>-<split>`, digest the split's
    fingerprint (its first 32 hex digits: MLflow's column holds 36; the whole one is in the profile), source the
    split's folder (or `source`: the raw file it came from), schema its id columns, profile its rows. Splits
    without rows are left out."""
    from deeplight.data.loader import read_manifest

    manifest = read_manifest(data_dir)
    fps, rows = manifest.get("fingerprints", {}), manifest.get("rows", {})
    schema = json.dumps({"mlflow_colspec": [{"type": "integer", "name": n, "required": True}
                                            for n in manifest["field_names"]]
                         + [{"type": "float", "name": "label", "required": True}]})
    folder = str(data_dir) if "://" in str(data_dir) else str(Path(data_dir).absolute())
    out = []
    for split in splits:
        if not rows.get(split) or not fps.get(split):
            continue
        uri = source or f"{folder.rstrip('/')}/{split}"
        ds = Dataset(name=f"{manifest.get('dataset', 'data')}-{split}", digest=str(fps[split])[:32],
                     source_type=uri.split("://")[0] if "://" in uri else "local",
                     source=json.dumps({"uri": uri}), schema=schema,
                     profile=json.dumps({"num_rows": rows[split], "fingerprint": fps[split],
                                         "feature_map_fingerprint": manifest.get("feature_map_fingerprint", "")}))
        out.append(DatasetInput(ds, tags=[InputTag("mlflow.data.context", split)]))
    return out


def log_splits(c: MlflowClient, run_id: str, data_dir: str | Path, splits: tuple[str, ...] = SPLITS,
               source: str | None = None) -> None:
    """`mlflow.log_input` for each split of a hashed dataset (`split_datasets`) on run `run_id`."""
    datasets = split_datasets(data_dir, splits, source)
    if datasets:
        c.log_inputs(run_id, datasets=datasets)


@contextlib.contextmanager
def system_metrics(run_id: str, seconds: float = SYSTEM_METRICS_SECONDS, resume: bool = False) -> Iterator[None]:
    """MLflow's system metrics monitor (`system/cpu_utilization_percentage`, memory, disk, network) on `run_id`
    while the block runs. A block shorter than one interval still gets one sample, taken at its end."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=seconds, resume_logging=resume,
                                   tracking_uri=tracking_uri())
    first_step = getattr(monitor, "_logging_step", None)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        if first_step is not None and monitor._logging_step == first_step:  # nothing published yet
            with contextlib.suppress(Exception):  # metrics about the run must never fail it
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()


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
    """Opens runs in one experiment; with `parent_run_id` every run is a child of that run. `data_dir`: a hashed
    dataset whose splits a new run logs as its dataset inputs; `system_metrics`: sample MLflow's system metrics
    while a run is open (training runs)."""

    def __init__(self, experiment: str = DEFAULT_EXPERIMENT, parent_run_id: str | None = None,
                 data_dir: str | Path | None = None, system_metrics: bool = False):
        self.client = client()
        self.experiment_id = experiment_id(self.client, experiment)
        self.parent_run_id = parent_run_id
        self.data_dir, self.system_metrics = data_dir, system_metrics

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
            if self.data_dir is not None:
                log_splits(self.client, run_id, self.data_dir)
        try:
            with (system_metrics(run_id, resume=bool(resume_id)) if self.system_metrics else contextlib.nullcontext()):
                yield MlflowRunLog(self.client, run_id)
        except BaseException:
            self.client.set_terminated(run_id, status="FAILED")
            raise
        self.client.set_terminated(run_id, status="FINISHED")
