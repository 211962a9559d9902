"""The sweep itself: workers, the dense baseline, trials, results and the final choice."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from deeplight.base.config import MODEL_SECTIONS, Config, SweepConfig
from deeplight.base.errors import DeeplightError

from deeplight.ops.sweep.measure import batch1_latency_us, compact_of, latency_ids, valid_view
from deeplight.ops.sweep.select import choose, pareto_front
from deeplight.ops.sweep.space import ATTR, DIRECTIONS, OBJECTIVES, SweepSettings, _LOCAL_SETTINGS
from deeplight.ops.sweep.storage import _diff, _open_study, _wait_for_attr, open_storage
from deeplight.ops.sweep.trial_log import TrialLogger, _OpenRun

_SWEEP = SweepConfig()


def _state(name: str) -> Any:
    import optuna

    return optuna.trial.TrialState[name]


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _comparable(cfg: Config) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.flat(MODEL_SECTIONS).items()
            if k not in _LOCAL_SETTINGS}


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

        from deeplight.ops.tracking import MlflowRunLog

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

        from deeplight.model.prune import prune

        live = ("COMPLETE", "RUNNING", "WAITING")
        earlier = [t for t in trial.study.get_trials(deepcopy=False)
                   if t.number < trial.number and t.state.name in live]
        if len(earlier) >= self.settings.n_trials:
            trial.set_user_attr("surplus", True)
            raise optuna.TrialPruned("the study already has n_trials complete or running trials")
        params = self.settings.space.suggest(trial)
        cfg = self.base.replace(**params)
        trial.set_user_attr("worker", worker_id())
        started = time.monotonic()
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        print(f"sweep {self.settings.study}: trial {trial.number} started on {worker_id()}: {shown}",
              file=sys.stderr, flush=True)
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
        print(f"sweep {self.settings.study}: trial {trial.number} done in {time.monotonic() - started:.0f} s: "
              f"valid AUC {result['valid']['auc']:.4f}, logloss {result['valid']['logloss']:.4f}, batch-1 latency "
              f"{latency:.1f} us, sparsity {pruning['sparsity']}", file=sys.stderr, flush=True)
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
    """The config trials start from: the dense checkpoint's data, features, model and train sections with
    today's prune defaults (`config_for_pruning`; only train.*/prune.* may then be overridden), else the Config
    defaults with `overrides` (dotted settings, e.g. `{"model.dnn": [16], "prune.ramp_epochs": 1}`)."""
    from deeplight.model.prune import config_for_pruning

    overrides = dict(overrides or {})
    if dense is None:
        return Config().replace(**overrides)
    fixed = [k for k in overrides if k.split(".")[0] in ("model", "data", "features")]
    if fixed:
        raise DeeplightError(f"{fixed}: a given dense checkpoint fixes the model, data and feature settings")
    return config_for_pruning(dense).replace(**overrides)


def open_sweep(data_dir: str | Path, settings: SweepSettings, base: Config, mlflow_parent: str | None = None
               ) -> tuple[Any, str, TrialLogger]:
    """Check the settings against the data and the model, open the storage and the study (created by the first
    worker, checked by the others) and its MLflow parent run: (study, parent run id, trial logger).
    Everything a user can get wrong fails here, before any training. `mlflow_parent`: nest the sweep's
    parent run under this run (a pipeline run)."""
    from deeplight.data.loader import read_manifest
    from deeplight.evaluation.sweep_report import machine_info
    from deeplight.ops.tracking import redact

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
    from deeplight.base.provenance import code_version
    from deeplight.ops.tracking import PARENT_TAG, MlflowRunLog, client, experiment_id, redact

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
    log.log_params({**base.flat(MODEL_SECTIONS), "sweep.study": settings.study, "sweep.n_trials": settings.n_trials,
                    "sweep.sampler": settings.sampler, "sweep.seed": settings.seed,
                    "sweep.tolerance": settings.tolerance, "sweep.latency_calls": settings.latency_calls,
                    **{f"sweep.space.{k}": ":".join(map(str, v)) for k, v in settings.space.to_dict().items()}})
    study.set_user_attr(ATTR + "mlflow_parent_run_id", run.info.run_id)
    return run.info.run_id


def _train_dense(data_dir: str | Path, out: Path, base: Config, logger: TrialLogger) -> None:
    """Train the dense model into `out` unless done; one process at a time (the others wait, then reuse it)."""
    from deeplight.model.prune import config_of
    from deeplight.model.train import train

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
    from deeplight.model import checkpoint
    from deeplight.model.deepfwfm import DeepFwFM

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


def finalize(study: Any, data_dir: str | Path, out_dir: str | Path, tolerance: float = _SWEEP.tolerance,
             register: str | None = None, latency_calls: int = _SWEEP.latency_calls, storage_url: str = "",
             dense: str | Path | None = None, score_test: bool = True) -> dict[str, Any]:
    """Choose the trade-off, time dense vs chosen side by side, score both on test (only now), write the report
    to out_dir/report and log it to the sweep's parent run; `register`: register the chosen model under that
    name. The chosen checkpoint is `summary["final"]["checkpoint"]`.

    `dense`: the dense checkpoint when the recorded path is not valid here (another machine or pod).
    `score_test=False`: leave the test split to a later step (the pipeline's evaluate component)."""
    from deeplight.evaluation.evaluate import evaluate_model
    from deeplight.evaluation.sweep_report import write_report
    from deeplight.ops.tracking import MlflowRunLog, client, redact

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
        from deeplight.ops.registry import register_model

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
    from deeplight.ops.registry import machine_tags  # the host the latencies were timed on

    log.set_tags({"chosen_trial": "none within tolerance" if chosen is None else str(chosen["number"]),
                  **({"chosen_run_id": chosen.get("mlflow_run_id", "")} if chosen else {}), **machine_tags()})
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
    from deeplight.ops.tracking import client

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
