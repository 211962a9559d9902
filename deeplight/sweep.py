"""Optuna sparsity sweeps: the accuracy/latency Pareto front of DeepLight pruning, resumable and distributed.

    from deeplight.sweep import SearchSpace, SweepSettings, run_sweep
    settings = SweepSettings(study="criteo", n_trials=20, space=SearchSpace(dnn=(0.5, 0.98)))
    summary = run_sweep("data/hashed", "out/sweep", settings)      # the same call again resumes the study
    summary["chosen"], summary["final"]["chosen_test"]["auc"]     # trial number, its test AUC

    deeplight sweep --data data/hashed --out out/sweep --n-trials 20 [--storage postgresql://...] [--register]

One multi-objective study over the `prune.*` settings of the Config (DNN, field-pair and embedding sparsity,
unstructured or structured, fine-tune epochs): maximize the pruned model's valid AUC, minimize the median
batch-1 latency of its compact engine (`CompactModel.score_one`, one thread) on real test ids (ids only, labels
are never read). The dense model is trained once (or given with `dense=`); every trial prunes from that
checkpoint on a view of the data without its test split, so trials can only see valid metrics; the test AUC of
the chosen trial is computed once, at the end.

MLflow: one sweep parent run (settings, dense baseline, Pareto plot + table, the choice, the final test AUC);
the dense training and every trial are child runs (trial params, both objectives, achieved sparsity, kept
field pairs). `TrialLogger` writes them: optuna_integration's MLflowCallback (deprecated) makes flat runs
after the fact, while here the child run is open during the trial so pruning logs its epochs into it.

Storage: Optuna's RDB storage, default `sqlite:///<mlruns>/optuna.db`; any SQLAlchemy URL (postgresql://...)
lets several workers (processes or pods) share one study. A worker starts a trial only while
COMPLETE + RUNNING < n_trials and stops once n_trials are COMPLETE; a trial that finds itself past the budget
(two workers raced for the last slot) ends at once as PRUNED without params (user attr `surplus`).

Resume: workers write a heartbeat to the storage every `heartbeat_interval` s; a RUNNING trial whose heartbeat
is older than `grace_period` (its worker was killed) is marked FAIL by the next worker that looks, and its
MLflow run FAILED. We chose the heartbeat over "mark every RUNNING trial FAIL at start-up" because that would
fail the live trials of other workers of a distributed study. Running the same command again loads the study
(its search space, base config and data must match), keeps its finished trials and continues until n_trials
are COMPLETE. Samplers are reseeded per trial from (seed, trial number): a run is reproducible, and neither a
second worker nor a resumed one replays the parameters of earlier trials.

Choice: the fastest COMPLETE trial whose valid AUC is within `tolerance` of the dense model's valid AUC.

    >>> pareto_front([(0.80, 10.0), (0.79, 5.0), (0.78, 6.0), (0.80, 12.0)])
    [0, 1]
    >>> rows = [{"number": 0, "state": "COMPLETE", "valid_auc": 0.800, "latency_us": 9.0},
    ...         {"number": 1, "state": "COMPLETE", "valid_auc": 0.7995, "latency_us": 4.0},
    ...         {"number": 2, "state": "COMPLETE", "valid_auc": 0.790, "latency_us": 2.0}]
    >>> choose(rows, dense_auc=0.8, tolerance=0.001)["number"]
    1
    >>> SearchSpace(dnn=(0.9, 0.5)).validate()
    Traceback (most recent call last):
    ...
    deeplight.errors.DeeplightError: search range prune.dnn = 0.9:0.5 is empty (low > high)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import random
import shutil
import socket
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from deeplight.config import Config
from deeplight.errors import DeeplightError

SAMPLERS = ("tpe", "nsga2", "random")
MODES = ("unstructured", "structured")
OBJECTIVES = ("valid_auc", "latency_us")  # maximize, minimize
DIRECTIONS = ("maximize", "minimize")
ATTR = "deeplight."  # prefix of the study user attrs this module writes
# Settings workers of one study may set differently (they change speed, not results): not compared on joining.
_LOCAL_SETTINGS = ("train.threads", "train.checkpoint_every")
_WAIT_S = 60.0  # how long a worker waits for the study creator to record the sweep's metadata


# --- settings ----------------------------------------------------------------------------------------------

def parse_range(text: str, kind: type = float) -> tuple[Any, Any]:
    """'0.5:0.95' -> (0.5, 0.95); '0.9' -> (0.9, 0.9) (a fixed value).

    >>> parse_range("0.5:0.95"), parse_range("2", int)
    ((0.5, 0.95), (2, 2))
    """
    parts = str(text).split(":")
    try:
        values = tuple(kind(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) not in (1, 2):
        raise DeeplightError(f"search range {text!r}: want LOW:HIGH or a single value, e.g. 0.5:0.95")
    return (values[0], values[-1])


@dataclass(frozen=True)
class SearchSpace:
    """Ranges of the searched `prune.*` settings (LOW == HIGH fixes a setting)."""

    dnn: tuple[float, float] = (0.0, 0.98)
    field: tuple[float, float] = (0.0, 0.98)
    embedding: tuple[float, float] = (0.0, 0.9)
    modes: tuple[str, ...] = MODES
    finetune_epochs: tuple[int, int] = (1, 2)

    def validate(self) -> None:
        for name in ("dnn", "field", "embedding"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise DeeplightError(f"search range prune.{name} = {lo}:{hi} is empty (low > high)")
            if not (0.0 <= lo and hi < 1.0) or math.isnan(lo) or math.isnan(hi):
                raise DeeplightError(f"search range prune.{name} = {lo}:{hi} must lie in [0, 1) "
                                     "(a sparsity of 1 would remove the whole component)")
        if not self.modes:
            raise DeeplightError("search space: no pruning mode given (want unstructured and/or structured)")
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise DeeplightError(f"search space: unknown pruning mode(s) {unknown}; choose from {', '.join(MODES)}")
        lo, hi = self.finetune_epochs
        if lo > hi:
            raise DeeplightError(f"search range prune.finetune_epochs = {lo}:{hi} is empty (low > high)")
        if lo < 1:
            raise DeeplightError(f"search range prune.finetune_epochs = {lo}:{hi}: want at least 1 epoch")

    def check_model(self, kind: str) -> None:
        """Fail before training when the model kind has no such component to prune."""
        has = {"dnn": kind == "deepfwfm", "field": kind in ("deepfwfm", "fwfm"), "embedding": kind != "lr"}
        for name, present in has.items():
            if not present and getattr(self, name)[1] > 0:
                raise DeeplightError(f"a {kind} model has no {name} weights to prune: set the {name} range to 0")

    def suggest(self, trial: Any) -> dict[str, Any]:
        """One point of the space as dotted Config settings (the trial's Optuna params have the same names)."""
        p: dict[str, Any] = {f"prune.{c}": trial.suggest_float(f"prune.{c}", *getattr(self, c))
                             for c in ("dnn", "field", "embedding")}
        p["prune.mode"] = trial.suggest_categorical("prune.mode", list(self.modes))
        p["prune.finetune_epochs"] = trial.suggest_int("prune.finetune_epochs", *self.finetune_epochs)
        return p

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SearchSpace":
        return cls(**{k: tuple(v) for k, v in d.items()})


@dataclass(frozen=True)
class SweepSettings:
    study: str = "deeplight-sweep"
    # SQLAlchemy URL; None: $DEEPLIGHT_OPTUNA_STORAGE (keeps a password out of pipeline parameters), else
    # sqlite:///<mlruns>/optuna.db
    storage: str | None = None
    n_trials: int = 20  # COMPLETE trials the study ends with, over all workers and restarts
    sampler: str = "tpe"  # tpe | nsga2 | random
    seed: int = 0
    tolerance: float = 0.001  # the chosen trial's valid AUC may be this much below the dense model's
    space: SearchSpace = field(default_factory=SearchSpace)
    latency_calls: int = 2000  # batch-1 calls whose median is a trial's latency
    heartbeat_interval: int = 10  # seconds between a running trial's heartbeats
    grace_period: int | None = None  # a trial silent this long is failed; None: 3 x heartbeat_interval
    experiment: str = "deeplight"  # MLflow experiment

    def validate(self) -> None:
        self.space.validate()
        if self.sampler not in SAMPLERS:
            raise DeeplightError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.n_trials < 1:
            raise DeeplightError(f"n_trials: want at least 1, got {self.n_trials}")
        if not self.tolerance >= 0:
            raise DeeplightError(f"tolerance: want an AUC difference >= 0, got {self.tolerance}")
        if self.latency_calls < 10:
            raise DeeplightError(f"latency_calls: want at least 10, got {self.latency_calls}")
        if self.heartbeat_interval < 1 or (self.grace_period is not None and self.grace_period <= 0):
            raise DeeplightError("heartbeat_interval must be >= 1 s and grace_period > 0 s")
        if not self.study or len(self.study) > 512:
            raise DeeplightError("study name: want 1 to 512 characters")

    @property
    def grace(self) -> int:
        return self.grace_period or 3 * self.heartbeat_interval

    def storage_url(self) -> str:
        if self.storage or os.environ.get("DEEPLIGHT_OPTUNA_STORAGE"):
            return self.storage or os.environ["DEEPLIGHT_OPTUNA_STORAGE"]
        from deeplight.tracking import mlruns_dir

        mlruns_dir().mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{mlruns_dir() / 'optuna.db'}"


# --- storage, sampler, study -------------------------------------------------------------------------------

def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 on_stale: Any = None) -> Any:
    """Optuna's RDBStorage on `url`; a DeeplightError naming the (redacted) URL when it cannot be reached."""
    import optuna

    from deeplight.tracking import redact

    given, url = url, _with_driver(url)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several processes on one file: wait for the write lock instead of failing at once.
        engine_kwargs["connect_args"] = {"timeout": 60}
    elif url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                  heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                                  heartbeat_stale_trial_callback=on_stale)
        except Exception as e:  # driver missing, bad URL, server down, file not writable: all user-fixable
            if _creation_race(e) and attempt < 4:
                # Workers starting together on an empty database race to create Optuna's tables (PostgreSQL:
                # duplicate pg_type key); the loser retries and finds them.
                time.sleep(0.5 + random.random())
                continue
            reason = redact(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            raise DeeplightError(f"cannot open the Optuna storage {redact(given)}: {type(e).__name__}: "
                                 f"{reason}") from None
    raise AssertionError("unreachable")


def _creation_race(e: Exception) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return any(k in text for k in ("duplicate key", "already exists", "uniqueviolation", "integrityerror"))


def _with_driver(url: str) -> str:
    """`postgresql://` with the driver that is installed: SQLAlchemy 2.1 defaults to psycopg 3, the lock pins
    psycopg2-binary."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def _make_sampler(name: str, seed: int) -> Any:
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def _sampler_class() -> type:
    import optuna

    class PerTrialSeededSampler(optuna.samplers.BaseSampler):
        """A sampler reseeded for every trial from (seed, trial number). One seeded sampler per worker would make
        two workers (or a restarted one) draw the same parameters again; this keeps runs reproducible without
        that. The wrapped samplers keep no state of their own between trials (they read the storage)."""

        def __init__(self, name: str, seed: int):
            self.name, self.seed = name, seed
            self._inner = _make_sampler(name, seed)

        def before_trial(self, study: Any, trial: Any) -> None:
            self._inner = _make_sampler(self.name, (self.seed * 1_000_003 + trial.number) % 2**32)
            self._inner.before_trial(study, trial)

        def infer_relative_search_space(self, study: Any, trial: Any) -> Any:
            return self._inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study: Any, trial: Any, search_space: Any) -> Any:
            return self._inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
            return self._inner.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            self._inner.after_trial(study, trial, state, values)

    return PerTrialSeededSampler


def make_sampler(name: str, seed: int) -> Any:
    if name not in SAMPLERS:
        raise DeeplightError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return _sampler_class()(name, seed)


def load_study(name: str, storage: Any, sampler: Any = None) -> Any:
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        raise DeeplightError(f"no study {name!r} in the Optuna storage") from None


def _open_study(storage: Any, settings: SweepSettings, meta: dict[str, Any]) -> tuple[Any, bool]:
    """(study, created). Exactly one of several racing workers creates it (the name is unique in the storage)
    and records the sweep's metadata; the others check theirs against it."""
    import optuna

    sampler = make_sampler(settings.sampler, settings.seed)
    try:
        study = optuna.create_study(storage=storage, study_name=settings.study, directions=list(DIRECTIONS),
                                    sampler=sampler)
        for key, value in meta.items():
            study.set_user_attr(ATTR + key, value)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        pass
    study = load_study(settings.study, storage, sampler)
    if [d.name.lower() for d in study.directions] != list(DIRECTIONS):
        raise DeeplightError(f"study {settings.study!r} exists with other objectives; use another --study")
    recorded = _wait_for_attr(study, "space")
    if recorded is None:  # the creator died before recording anything: adopt the study
        for key, value in meta.items():
            study.set_user_attr(ATTR + key, value)
        return study, False
    attrs = study.user_attrs
    for key, what in (("space", "search space"), ("config", "base config"), ("data", "data")):
        if attrs.get(ATTR + key) != meta[key]:
            diff = _diff(attrs.get(ATTR + key) or {}, meta[key])
            raise DeeplightError(f"study {settings.study!r} was started with another {what} ({diff}); run the "
                                 "same command to resume it, or use another --study")
    return study, False


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4]) or "?"


def _wait_for_attr(study: Any, key: str, timeout: float = _WAIT_S) -> Any:
    """A study user attr another worker is about to write (None after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        value = study.user_attrs.get(ATTR + key)
        if value is not None or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


# --- MLflow ------------------------------------------------------------------------------------------------

class TrialLogger:
    """Mirrors Optuna trials into MLflow child runs of the sweep's parent run.

    `child_run(trial)` opens the trial's run (pruning logs its epochs into it); as an Optuna callback it logs the
    trial's objectives, achieved sparsity and kept pairs and closes the run; as the storage's heartbeat-stale
    callback it closes the run of a trial whose worker died as FAILED."""

    def __init__(self, experiment: str, parent_run_id: str, tags: dict[str, str]):
        from deeplight.tracking import MlflowTracker

        self.tracker = MlflowTracker(experiment, parent_run_id=parent_run_id)
        self.client, self.parent_run_id, self.tags = self.tracker.client, parent_run_id, tags

    @contextlib.contextmanager
    def child_run(self, trial: Any) -> Iterator[Any]:
        from deeplight.tracking import PARENT_TAG, MlflowRunLog

        run = self.client.create_run(self.tracker.experiment_id, run_name=f"trial-{trial.number}", tags={
            **self.tags, PARENT_TAG: self.parent_run_id, "optuna.trial_number": str(trial.number),
            "deeplight.step": "sweep_trial"})
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        try:
            yield MlflowRunLog(self.client, run.info.run_id)
        except BaseException:
            self.client.set_terminated(run.info.run_id, status="FAILED")
            raise

    def __call__(self, study: Any, trial: Any) -> None:
        """Optuna callback, after each trial of this worker."""
        from deeplight.tracking import MlflowRunLog

        run_id = trial.user_attrs.get("mlflow_run_id")
        if not run_id:  # surplus trials never opened a run
            return
        if trial.state.name != "COMPLETE":
            self.client.set_terminated(run_id, status="FAILED")
            return
        log = MlflowRunLog(self.client, run_id)
        attrs = trial.user_attrs
        # objective_*: what Optuna saw (pruning's own per-epoch `valid_auc` history is in the same run)
        log.log_metrics({"objective_valid_auc": trial.values[0], "objective_latency_us": trial.values[1],
                         "valid_logloss": attrs.get("valid_logloss"), "nonzero_params": attrs.get("nonzero"),
                         "kept_pairs": len(attrs.get("kept_pairs", [])),
                         **{f"sparsity_{k}": v for k, v in attrs.get("sparsity", {}).items()}})
        log.set_tags({"optuna.state": "COMPLETE", "top_kept_pairs": ", ".join(attrs.get("top_pairs", [])[:10])})
        fields = (study.user_attrs.get(ATTR + "data") or {}).get("fields") or []
        pairs = [{"pair": f"{fields[i]} x {fields[j]}" if fields else f"{i} x {j}", "i": i, "j": j, "r": r}
                 for i, j, r in attrs.get("kept_pairs", [])]
        with _tempdir() as tmp:
            path = Path(tmp) / "kept_pairs.json"
            path.write_text(json.dumps(pairs, indent=1))  # strongest first
            log.log_artifact(path)
        self.client.set_terminated(run_id, status="FINISHED")

    def on_stale(self, study: Any, trial: Any) -> None:
        """Heartbeat-stale callback: the trial was just marked FAIL because its worker stopped beating.

        A worker can die after opening the trial's run but before recording its id in the trial, so the run is
        also looked up by its tags (study, parent run, trial number); without that it would stay RUNNING.
        """
        from deeplight.tracking import PARENT_TAG

        run_ids = {trial.user_attrs.get("mlflow_run_id")} - {None}
        if not run_ids:
            found = self.client.search_runs(
                [self.tracker.experiment_id],
                filter_string=" and ".join(f"tags.`{k}` = '{v}'" for k, v in {
                    "optuna.study": self.tags.get("optuna.study", ""), PARENT_TAG: self.parent_run_id,
                    "optuna.trial_number": str(trial.number), "deeplight.step": "sweep_trial"}.items()))
            run_ids = {r.info.run_id for r in found}
        for run_id in sorted(run_ids):
            self.client.set_tag(run_id, "optuna.state", "FAIL (worker died: heartbeat stale)")
            self.client.set_terminated(run_id, status="FAILED")


class _OpenRun:
    """A Tracker handing pruning the trial's already-open run (TrialLogger closes it)."""

    def __init__(self, log: Any):
        self.log = log

    @contextlib.contextmanager
    def run(self, name: str, resume_id: str | None = None, tags: dict[str, Any] | None = None) -> Iterator[Any]:
        if tags:
            self.log.set_tags(tags)
        yield self.log


@contextlib.contextmanager
def _tempdir() -> Iterator[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        yield tmp


# --- data, latency -----------------------------------------------------------------------------------------

def valid_view(data_dir: str | Path, out: Path) -> Path:
    """A view of a hashed dataset without its test split (symlinks to train/ and valid/, test rows = 0), so that
    pruning cannot score the test split during the sweep. Built once, atomically; shared by concurrent workers."""
    from deeplight.data import read_manifest
    from deeplight.fsutil import write_json

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

    from deeplight.data import read_manifest, split_files

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
    from deeplight import checkpoint
    from deeplight.compact import CompactModel
    from deeplight.model import DeepFwFM

    ck = checkpoint.load(checkpoint_path)
    model = DeepFwFM.from_spec(ck["spec"])
    model.load_state_dict(ck["model"])
    return CompactModel.from_model(model.eval(), ck.get("field_names"))


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


# --- selection ---------------------------------------------------------------------------------------------

def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (auc, latency) points no other point beats on both (higher AUC, lower latency)."""
    front = []
    for i, (a, t) in enumerate(points):
        dominated = any((a2 >= a and t2 <= t) and (a2 > a or t2 < t) for j, (a2, t2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def choose(rows: list[dict[str, Any]], dense_auc: float, tolerance: float) -> dict[str, Any] | None:
    """The fastest COMPLETE trial whose valid AUC >= dense valid AUC - tolerance (ties: higher AUC)."""
    ok = [r for r in rows if r["state"] == "COMPLETE" and r["valid_auc"] >= dense_auc - tolerance]
    return min(ok, key=lambda r: (r["latency_us"], -r["valid_auc"], r["number"])) if ok else None


# --- the sweep ---------------------------------------------------------------------------------------------

def _state(name: str) -> Any:
    import optuna

    return optuna.trial.TrialState[name]


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _comparable(cfg: Config) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.flat().items() if k not in _LOCAL_SETTINGS}


def _data_meta(manifest: dict[str, Any]) -> dict[str, Any]:
    fps = manifest.get("fingerprints", {})
    return {"dataset": manifest.get("dataset", ""), "train": fps.get("train", ""), "valid": fps.get("valid", ""),
            "feature_map": manifest.get("feature_map_fingerprint", ""), "fields": list(manifest["field_names"]),
            "rows": dict(manifest["rows"])}


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock between processes sharing `path`'s file system (workers training the dense model)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class Sweep:
    """One worker's handle on a sweep: `prepare()` builds it, `work()` runs trials, `finalize()` chooses."""

    settings: SweepSettings
    study: Any  # optuna.Study
    storage_url: str
    data_dir: Path
    out_dir: Path
    trials_dir: Path  # out_dir/trials/<study>/trial-<number>: each trial's pruning run
    view: Path  # the data without its test split, what trials prune on
    base: Config  # the dense model's config; a trial's is base.replace(**trial params)
    dense_path: Path
    ids: np.ndarray  # test ids the latency is timed on
    parent_run_id: str
    logger: TrialLogger
    completed: int = 0  # trials this worker completed

    # -- trials --------------------------------------------------------------------------------------------
    def work(self) -> int:
        """Run trials until the study has n_trials COMPLETE ones; returns how many this worker completed."""
        import optuna

        from deeplight.tracking import MlflowRunLog

        n = self.settings.n_trials
        MlflowRunLog(self.logger.client, self.parent_run_id).set_tags({"optuna.n_trials": n})
        if self.logger.client.get_run(self.parent_run_id).info.status != "RUNNING":
            self.logger.client.update_run(self.parent_run_id, status="RUNNING")
        while True:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(self.study)
            states = [t.state.name for t in self.study.get_trials(deepcopy=False)]
            complete, live = states.count("COMPLETE"), states.count("RUNNING") + states.count("WAITING")
            if complete >= n:
                return self.completed
            if complete + live >= n:  # the rest is running elsewhere: wait (a dead worker's trial goes stale)
                time.sleep(min(self.settings.heartbeat_interval, 5))
                continue
            self.study.optimize(self._objective, n_trials=1, callbacks=[self.logger], gc_after_trial=False)

    def _objective(self, trial: Any) -> tuple[float, float]:
        import optuna

        from deeplight.prune import prune

        live = ("COMPLETE", "RUNNING", "WAITING")
        earlier = [t for t in trial.study.get_trials(deepcopy=False)
                   if t.number < trial.number and t.state.name in live]
        if len(earlier) >= self.settings.n_trials:
            trial.set_user_attr("surplus", True)
            raise optuna.TrialPruned("the study already has n_trials complete or running trials")
        params = self.settings.space.suggest(trial)
        cfg = self.base.replace(**params)
        trial.set_user_attr("worker", worker_id())
        out = (self.trials_dir / f"trial-{trial.number:04d}").absolute()
        shutil.rmtree(out, ignore_errors=True)  # a trial number is never resumed: leftovers are of a dead study
        with self.logger.child_run(trial) as log:
            result = prune(self.dense_path, self.view, out, cfg, tracker=_OpenRun(log),
                           run_name=f"trial-{trial.number}")
            latency = batch1_latency_us([compact_of(out / "best.pt")], self.ids, self.settings.latency_calls)[0]
        (out / "last.pt").unlink(missing_ok=True)  # resume state of a finished run: only best.pt is needed
        pruning = result["pruning"]
        attrs = {"valid_logloss": result["valid"]["logloss"], "sparsity": pruning["sparsity"],
                 "nonzero": pruning["nonzero"]["total"], "params_total": pruning["params"]["total"],
                 "kept_pairs": [[p["i"], p["j"], round(p["r"], 6)] for p in pruning["kept_pairs"]],
                 "top_pairs": [p["pair"] for p in pruning["kept_pairs"][:20]],
                 "best_epoch": result["best_epoch"], "checkpoint": str(out / "best.pt")}
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        self.completed += 1
        return float(result["valid"]["auc"]), float(latency)

    # -- the end -------------------------------------------------------------------------------------------
    def complete(self) -> bool:
        # A trial only starts while COMPLETE + RUNNING < n_trials, so once n_trials are COMPLETE anything still
        # running is a surplus trial about to end or a dead worker's: the results are final.
        return len(self.study.get_trials(deepcopy=False, states=(_state("COMPLETE"),))) >= self.settings.n_trials

    def finalize(self, register: str | None = None) -> dict[str, Any]:
        return finalize(self.study, self.data_dir, self.out_dir, tolerance=self.settings.tolerance,
                        register=register, latency_calls=self.settings.latency_calls, storage_url=self.storage_url)


def base_config(overrides: dict[str, Any] | None = None, dense: str | Path | None = None) -> Config:
    """The config trials start from: the dense checkpoint's (only train.*/prune.* may then be overridden), else
    the Config defaults with `overrides` (dotted settings, e.g. `{"model.dnn": [16], "prune.ramp_epochs": 1}`)."""
    from deeplight.prune import config_of

    overrides = dict(overrides or {})
    if dense is None:
        return Config().replace(**overrides)
    fixed = [k for k in overrides if k.split(".")[0] in ("model", "data", "features")]
    if fixed:
        raise DeeplightError(f"{fixed}: a given dense checkpoint fixes the model, data and feature settings")
    return config_of(dense).replace(**overrides)


def open_sweep(data_dir: str | Path, settings: SweepSettings, base: Config, mlflow_parent: str | None = None
               ) -> tuple[Any, str, TrialLogger]:
    """Check the settings against the data and the model, open the storage and the study (created by the first
    worker, checked by the others) and its MLflow parent run: (study, parent run id, trial logger).
    Everything a user can get wrong fails here, before any training. `mlflow_parent`: nest the sweep's
    parent run under this run (a pipeline run)."""
    from deeplight.data import read_manifest
    from deeplight.report import machine_info
    from deeplight.tracking import redact

    settings.validate()
    manifest = read_manifest(data_dir)
    if not manifest["rows"].get("valid"):
        raise DeeplightError(f"{data_dir}: the valid split is empty; the sweep selects on valid AUC")
    latency_ids(data_dir, limit=1)  # the test split must have rows to time on
    settings.space.check_model(base.model.kind)
    url = settings.storage_url()
    holder: dict[str, TrialLogger] = {}
    storage = open_storage(url, settings.heartbeat_interval, settings.grace,
                           on_stale=lambda study, trial: holder["logger"].on_stale(study, trial) if holder else None)
    meta = {"space": settings.space.to_dict(), "config": _comparable(base), "data": _data_meta(manifest),
            "machine": machine_info(), "sampler": settings.sampler, "seed": settings.seed,
            "experiment": settings.experiment}
    study, created = _open_study(storage, settings, meta)
    parent_run_id = _parent_run(study, settings, base, url, created, mlflow_parent)
    holder["logger"] = TrialLogger(settings.experiment, parent_run_id,
                                   {"optuna.study": settings.study, "optuna.storage": redact(url)})
    return study, parent_run_id, holder["logger"]


def prepare(data_dir: str | Path, out_dir: str | Path, settings: SweepSettings, overrides: dict[str, Any] | None = None,
            dense: str | Path | None = None, mlflow_parent: str | None = None) -> Sweep:
    """Validate everything (`open_sweep`), then get the dense model: `dense`, or trained once into OUT/dense."""
    settings.validate()  # before reading a checkpoint: bad settings fail first and fast
    base = base_config(overrides, dense)
    study, parent_run_id, logger = open_sweep(data_dir, settings, base, mlflow_parent)
    out = Path(out_dir)
    dense_path = Path(dense) if dense is not None else out / "dense" / "best.pt"
    if dense is None:
        _train_dense(data_dir, out / "dense", base, logger)
    _record_dense(study, dense_path)
    return Sweep(settings=settings, study=study, storage_url=settings.storage_url(), data_dir=Path(data_dir),
                 out_dir=out, trials_dir=out / "trials" / settings.study,
                 view=valid_view(data_dir, out / "data-without-test"), base=base, dense_path=dense_path,
                 ids=latency_ids(data_dir), parent_run_id=parent_run_id, logger=logger)


def _parent_run(study: Any, settings: SweepSettings, base: Config, url: str, created: bool,
                mlflow_parent: str | None) -> str:
    """The sweep's MLflow parent run: made by the study's creator, found by the others (and on resume)."""
    from deeplight.provenance import code_version
    from deeplight.tracking import PARENT_TAG, MlflowRunLog, client, experiment_id, redact

    run_id = study.user_attrs.get(ATTR + "mlflow_parent_run_id")
    if run_id is None and not created:
        run_id = _wait_for_attr(study, "mlflow_parent_run_id")
    if run_id is not None:
        return run_id
    c = client()
    tags = {"deeplight.kind": "sweep", "optuna.study": settings.study, "optuna.storage": redact(url),
            "code_version": code_version()}
    if mlflow_parent:
        tags[PARENT_TAG] = mlflow_parent
    run = c.create_run(experiment_id(c, settings.experiment), run_name=f"sweep-{settings.study}", tags=tags)
    log = MlflowRunLog(c, run.info.run_id)
    log.log_params({**base.flat(), "sweep.study": settings.study, "sweep.n_trials": settings.n_trials,
                    "sweep.sampler": settings.sampler, "sweep.seed": settings.seed,
                    "sweep.tolerance": settings.tolerance, "sweep.latency_calls": settings.latency_calls,
                    **{f"sweep.space.{k}": ":".join(map(str, v)) for k, v in settings.space.to_dict().items()}})
    study.set_user_attr(ATTR + "mlflow_parent_run_id", run.info.run_id)
    return run.info.run_id


def _train_dense(data_dir: str | Path, out: Path, base: Config, logger: TrialLogger) -> None:
    """Train the dense model into `out` unless done; one process at a time (the others wait, then reuse it)."""
    from deeplight.prune import config_of
    from deeplight.train import train

    with _file_lock(out.parent / ".dense.lock"):
        if (out / "results.json").exists() and (out / "best.pt").exists():
            def training(cfg: Config) -> dict[str, Any]:  # pruning settings do not change a dense model
                return {k: v for k, v in _comparable(cfg).items() if not k.startswith("prune.")}

            trained, wanted = training(config_of(out / "best.pt")), training(base)
            if trained != wanted:
                raise DeeplightError(f"{out} holds a dense model trained with other settings "
                                     f"({_diff(trained, wanted)}); use another --out")
            return
        train(data_dir, out, base, tracker=_DenseTracker(logger), run_name="dense")


class _DenseTracker:
    """Dense training as a child run of the sweep (tagged so the report can find it)."""

    def __init__(self, logger: TrialLogger):
        self.logger = logger

    def run(self, name: str, resume_id: str | None = None, tags: dict[str, Any] | None = None) -> Any:
        return self.logger.tracker.run(name, resume_id=resume_id,
                                       tags={**self.logger.tags, "deeplight.step": "dense", **(tags or {})})


def _record_dense(study: Any, dense_path: Path) -> None:
    """Record the dense model's valid metrics in the study once; every later worker must bring the same model."""
    from deeplight import checkpoint
    from deeplight.model import DeepFwFM

    ck = checkpoint.load(dense_path)
    valid = {k: float(v) for k, v in ck.get("valid", {}).items() if isinstance(v, (int, float))}
    if "auc" not in valid:
        raise DeeplightError(f"{dense_path}: no valid AUC in the checkpoint (pass best.pt of `deeplight train`)")
    mine = {"checkpoint": str(dense_path.resolve()), "valid": valid, "epoch": ck.get("epoch"),
            "params": int(DeepFwFM.from_spec(ck["spec"]).param_counts()["total"])}
    recorded = study.user_attrs.get(ATTR + "dense")
    if recorded is None:
        study.set_user_attr(ATTR + "dense", mine)
    elif abs(recorded["valid"]["auc"] - valid["auc"]) > 1e-9:
        raise DeeplightError(f"study {study.study_name!r} prunes another dense model (valid AUC "
                             f"{recorded['valid']['auc']:.6f}, {recorded['checkpoint']}) than {dense_path} "
                             f"(valid AUC {valid['auc']:.6f}); pass that checkpoint with --dense")


# --- results -----------------------------------------------------------------------------------------------

def trial_row(t: Any) -> dict[str, Any]:
    a = t.user_attrs
    row = {"number": t.number, "state": t.state.name, "params": dict(t.params),
           "valid_auc": t.values[0] if t.values else None, "latency_us": t.values[1] if t.values else None,
           "duration_s": t.duration.total_seconds() if t.duration else None}
    for key in ("valid_logloss", "sparsity", "nonzero", "params_total", "kept_pairs", "top_pairs", "checkpoint",
                "mlflow_run_id", "worker", "surplus", "best_epoch"):
        if key in a:
            row[key] = a[key]
    return row


def collect(study: Any) -> dict[str, Any]:
    """Everything a report needs, from the study alone (plain JSON-able dict)."""
    attrs = {k[len(ATTR):]: v for k, v in study.user_attrs.items() if k.startswith(ATTR)}
    rows = [trial_row(t) for t in study.get_trials(deepcopy=False)]
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    front = pareto_front([(r["valid_auc"], r["latency_us"]) for r in complete])
    states: dict[str, int] = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    return {"study": study.study_name, "objectives": list(OBJECTIVES), "directions": list(DIRECTIONS),
            **{k: attrs.get(k) for k in ("space", "config", "data", "machine", "sampler", "seed", "experiment",
                                         "dense", "mlflow_parent_run_id", "final")},
            "trials": rows, "pareto": [complete[i]["number"] for i in front], "states": states}


def finalize(study: Any, data_dir: str | Path, out_dir: str | Path, tolerance: float = 0.001,
             register: str | None = None, latency_calls: int = 2000, storage_url: str = "",
             dense: str | Path | None = None, score_test: bool = True) -> dict[str, Any]:
    """Choose the trade-off, time dense vs chosen side by side, score both on test (only now), write the report
    to out_dir/report and log it to the sweep's parent run; `register`: register the chosen model under that
    name. The chosen checkpoint is `summary["final"]["checkpoint"]`.

    `dense`: the dense checkpoint when the recorded path is not valid here (another machine or pod).
    `score_test=False`: leave the test split to a later step (the pipeline's evaluate component)."""
    from deeplight.evaluate import evaluate_model
    from deeplight.report import write_report
    from deeplight.tracking import MlflowRunLog, client, redact

    summary = collect(study)
    if summary["dense"] is None:
        raise DeeplightError(f"study {study.study_name!r} has no dense model recorded: run `deeplight sweep` first")
    summary["storage"] = redact(storage_url)
    summary["tolerance"] = tolerance
    dense_ckpt = Path(dense) if dense else Path(summary["dense"]["checkpoint"])
    chosen = choose(summary["trials"], summary["dense"]["valid"]["auc"], tolerance)
    summary["chosen"] = chosen["number"] if chosen else None
    out = Path(out_dir)
    ids = latency_ids(data_dir)
    c = client()
    parent = summary["mlflow_parent_run_id"]
    log = MlflowRunLog(c, parent)
    final: dict[str, Any] = {"tolerance": tolerance, "chosen": summary["chosen"]}
    if chosen is not None:
        chosen_ckpt = _trial_checkpoint(chosen, out / "chosen")
        dense_us, chosen_us = batch1_latency_us([compact_of(dense_ckpt), compact_of(chosen_ckpt)], ids, latency_calls)
        final |= {"dense_latency_us": dense_us, "chosen_latency_us": chosen_us, "speedup": dense_us / chosen_us,
                  "checkpoint": str(chosen_ckpt)}
    if chosen is not None and score_test:
        # The test split, once, for the chosen model and its dense baseline.
        tests = {}
        for name, ckpt in (("dense", dense_ckpt), ("chosen", chosen_ckpt)):
            m = evaluate_model(str(ckpt), str(data_dir), split="test", out_json=str(out / f"{name}_test.json"),
                               latency_rounds=1, latency_budget_s=0.05)
            tests[name] = {k: m[k] for k in ("auc", "logloss", "rows") if k in m}
        final |= {"dense_test": tests["dense"], "chosen_test": tests["chosen"]}
    if chosen is None:
        final["dense_latency_us"] = batch1_latency_us([compact_of(dense_ckpt)], ids, latency_calls)[0]
    if register:
        if chosen is None:
            raise DeeplightError(f"no trial is within {tolerance} valid AUC of the dense model: nothing to register")
        if not score_test:
            raise DeeplightError("registering needs the test metrics: finalize with score_test=True")
        from deeplight.registry import register_model

        metrics = json.loads((out / "chosen_test.json").read_text())
        final["registered"] = _jsonable(register_model(
            str(final["checkpoint"]), str(data_dir), register, metrics=metrics, parent_run_id=parent,
            tags={"optuna.study": study.study_name, "optuna.trial_number": str(chosen["number"])}))
    summary["final"] = final
    files = write_report(summary, out / "report")
    for path in files.values():
        log.log_artifact(path, "sweep")
    log.log_metrics({"dense_valid_auc": summary["dense"]["valid"]["auc"], "dense_latency_us": final["dense_latency_us"],
                     "trials_complete": summary["states"].get("COMPLETE", 0), "pareto_size": len(summary["pareto"]),
                     **({"chosen_valid_auc": chosen["valid_auc"], "chosen_latency_us": final["chosen_latency_us"],
                         "speedup": final["speedup"]} if chosen else {}),
                     **{f"{name}_auc": final[name]["auc"] for name in ("dense_test", "chosen_test") if name in final}})
    log.set_tags({"chosen_trial": "none within tolerance" if chosen is None else str(chosen["number"]),
                  **({"chosen_run_id": chosen.get("mlflow_run_id", "")} if chosen else {})})
    study.set_user_attr(ATTR + "final", final)
    c.set_terminated(parent, status="FINISHED")
    return summary


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def _trial_checkpoint(row: dict[str, Any], dst: Path) -> Path:
    """The trial's best.pt: its own path when this machine sees it, else its MLflow artifact (another pod)."""
    path = Path(row.get("checkpoint", ""))
    if path.is_file():
        return path
    if not row.get("mlflow_run_id"):
        raise DeeplightError(f"trial {row['number']}: checkpoint {path} not found and no MLflow run to fetch it from")
    from deeplight.tracking import client

    dst.mkdir(parents=True, exist_ok=True)
    return Path(client().download_artifacts(row["mlflow_run_id"], "best.pt", str(dst)))


def run_sweep(data_dir: str | Path, out_dir: str | Path, settings: SweepSettings,
              overrides: dict[str, Any] | None = None, dense: str | Path | None = None, finalize: bool = True,
              register: str | None = None, mlflow_parent: str | None = None) -> dict[str, Any]:
    """One worker: prepare, run trials until the study is complete, then (when no other worker is still running
    a trial, and `finalize`) choose, test and report. Returns the summary (`collect` + `final`)."""
    sweep = prepare(data_dir, out_dir, settings, overrides=overrides, dense=dense, mlflow_parent=mlflow_parent)
    completed = sweep.work()
    if finalize and sweep.complete():
        summary = sweep.finalize(register=register)
    else:
        summary = collect(sweep.study)
    summary["completed_here"] = completed
    return summary


def brief(summary: dict[str, Any]) -> dict[str, Any]:
    """What the CLI prints: the choice and the counts, not every trial."""
    rows = {r["number"]: r for r in summary["trials"]}
    chosen = rows.get(summary.get("chosen")) if summary.get("chosen") is not None else None
    pick = ("number", "params", "valid_auc", "latency_us", "sparsity", "nonzero", "checkpoint", "mlflow_run_id")
    return {"study": summary["study"], "states": summary["states"], "pareto": summary["pareto"],
            "dense": summary.get("dense"), "chosen": {k: chosen.get(k) for k in pick} if chosen else None,
            "final": summary.get("final"), "completed_here": summary.get("completed_here"),
            "mlflow_parent_run_id": summary.get("mlflow_parent_run_id")}


# --- pipeline steps (thin KFP wrappers in components/sweep.py) ----------------------------------------------

def pipeline_settings(study: str, kfp_run_id: str = "", storage: str = "", n_trials: int = 20, sampler: str = "tpe",
                      seed: int = 0, tolerance: float = 0.001, dnn_range: str = "0.0:0.98",
                      field_range: str = "0.0:0.98", embedding_range: str = "0.0:0.9",
                      modes: str = "unstructured,structured", finetune_range: str = "1:2",
                      latency_calls: int = 2000) -> SweepSettings:
    """SweepSettings from a pipeline's plain parameters; every step derives the same settings from them. An
    empty `study` names it after the KFP run (a new study per run); an empty `storage` means
    $DEEPLIGHT_OPTUNA_STORAGE, else the sqlite default (shared only when every step sees the same disk)."""
    space = SearchSpace(dnn=parse_range(dnn_range), field=parse_range(field_range),
                        embedding=parse_range(embedding_range),
                        modes=tuple(m.strip() for m in modes.split(",") if m.strip()),
                        finetune_epochs=parse_range(finetune_range, int))
    return SweepSettings(study=study or f"sweep-{kfp_run_id}", storage=storage or None, n_trials=n_trials,
                         sampler=sampler, seed=seed, tolerance=tolerance, space=space, latency_calls=latency_calls)


def init_step(data_dir: str, config_json: str, settings: SweepSettings, workers: int, parent_run_id: str = ""
              ) -> list[int]:
    """Before the dense model is trained: check every setting, create the study and the sweep's MLflow run
    (a child of the pipeline run). Returns the worker slots the pipeline fans out over."""
    if workers < 1:
        raise DeeplightError(f"workers: want at least 1, got {workers}")
    try:
        base = Config.from_dict(json.loads(config_json))
    except (json.JSONDecodeError, TypeError) as e:
        raise DeeplightError(f"config_json: not a deeplight config ({e})") from None
    open_sweep(data_dir, settings, base, mlflow_parent=parent_run_id or None)
    return list(range(workers))


def worker_step(data_dir: str, dense_dir: str, settings: SweepSettings, out_dir: str) -> int:
    """One ParallelFor worker: trials until the study is complete. Returns the trials it completed."""
    return run_sweep(data_dir, out_dir, settings, dense=Path(dense_dir) / "best.pt", finalize=False)["completed_here"]


def select_step(data_dir: str, dense_dir: str, settings: SweepSettings, model_dir: str, report_dir: str
                ) -> dict[str, Any]:
    """Choose the trade-off (no test scoring: the pipeline's evaluate step does it), write the report to
    report_dir and the chosen checkpoint to model_dir/best.pt."""
    study = load_study(settings.study, open_storage(settings.storage_url()))
    with _tempdir() as tmp:
        summary = finalize(study, data_dir, tmp, tolerance=settings.tolerance, latency_calls=settings.latency_calls,
                           storage_url=settings.storage_url(), dense=Path(dense_dir) / "best.pt", score_test=False)
        final = summary["final"]
        if final.get("checkpoint") is None:
            raise DeeplightError(f"no trial of study {settings.study!r} is within {settings.tolerance} valid AUC of "
                                 f"the dense model ({summary['dense']['valid']['auc']:.5f}): nothing to register")
        Path(model_dir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(final["checkpoint"], Path(model_dir) / "best.pt")
        shutil.copytree(Path(tmp) / "report", report_dir, dirs_exist_ok=True)
    return summary
