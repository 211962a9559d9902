"""MLflow model registry: log evaluations, register a model that scores raw rows, promote it behind a gate.

    from deeplight.ops.registry import log_evaluation, register_model, promote
    reg = register_model("out/pruned", "data/hashed", "deeplight-ctr", parent_run_id=run_id)  # -> challenger
    decision = promote("deeplight-ctr", tolerance=0.001, latency_slo_us=50)            # challenger -> champion?
    model = mlflow.pyfunc.load_model("models:/deeplight-ctr@champion")
    model.predict(raw_rows_df)      # columns of the raw dataset (label optional) -> click probabilities

The registered model is a pyfunc (`RawRowsModel`) over raw rows, the original Criteo/Avazu columns as strings
or numbers (a DataFrame, a list of dicts): rows are validated by `ingest.parse_records` (the label and id
columns optional), mapped to ids by the feature map, scored by the compact engine (no torch at serving time).
Its artifacts: compact.npz, feature_map.json, model.onnx, model.torchscript.pt (the exports, attached for other
runtimes). The signature lists every raw column with type Any, so MLflow names a missing column itself and
leaves values to our validation, which names the row and field of a bad value; a bad value reaches a client
of `mlflow models serve` as HTTP 400 with that message, never a stack trace.

Code: models from code, no pickle. The pyfunc is `MODEL_CODE` (three lines that build a `RawRowsModel`) plus
the `deeplight` package it was registered with (`code_paths`), which MLflow puts on sys.path when loading. So
`mlflow.pyfunc.load_model` and `mlflow models serve --env-manager local` need only the pinned dependencies
(`pip_requirements`: mlflow, numpy, pandas, pyarrow, numba, tqdm), not an installed deeplight; with
`--env-manager virtualenv` MLflow installs those from PyPI.

Aliases, not stages: a new version gets `challenger`; `promote` moves `champion` to it when it passes the gate
(test AUC at most `tolerance` below the champion's on the same test data; the served latency of one raw row,
measured at registration through the registered pyfunc itself, within the SLO).
Version tags carry the evaluation (`test_auc`, `latency_us_b1`, ...), the served latency (`served_latency_us_1row`,
`served_rows_per_s_1000`, with the host's CPU and load), the sparsity targets, the data and
feature-map fingerprints, the code version and the parent pipeline run; `promotion.*` tags the decision.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from deeplight.base.config import MODEL_SECTIONS, Config, PromoteConfig
from deeplight.base.errors import DeeplightError
from deeplight.ops.pyfunc import MODEL_CODE, RawRowsModel, input_example, signature
from deeplight.ops.tracking import MlflowTracker, client, log_splits, model_label, redact, run_label, tracking_uri

_PROMOTE = PromoteConfig()
SERVED_TAG = "served_latency_us_1row"  # the gate's latency: one raw row through the registered pyfunc
CHALLENGER, CHAMPION = "challenger", "champion"
ARTIFACT_FILES = {"compact": "compact.npz", "feature_map": "feature_map.json", "onnx": "model.onnx",
                  "torchscript": "model.torchscript.pt"}
SERVING_PACKAGES = ("mlflow", "numpy", "pandas", "pyarrow", "numba", "tqdm")  # what scoring imports
_AUC_SLACK = 1e-12  # "not more than tolerance below" must hold for an AUC exactly tolerance below


# --- evaluation runs -------------------------------------------------------------------------------------

def log_evaluation(metrics: dict, plots_dir: str | None, tracker: Any, name: str | None = None) -> None:
    """One MLflow run with an evaluation already made: metrics, tags, evaluation.json and plots. Prefer
    `evaluate_tracked`, whose run lasts as long as the evaluation."""
    evaluate_tracked(lambda: metrics, plots_dir, tracker, name)


def evaluate_tracked(evaluate: Callable[[], dict], plots_dir: str | Path | None, tracker: Any,
                     name: str | None = None) -> dict:
    """Run `evaluate()` inside its MLflow run (default name `evaluate-<split>`: give a better one), so that the
    run's duration is the evaluation's, and log its result there; without a tracker just evaluate."""
    if tracker is None:
        return evaluate()
    with tracker.run(name or "evaluate-test", tags={"stage": "evaluate"}) as log:
        metrics = evaluate()
        _log_evaluation_to(log, metrics, plots_dir)
    return metrics


def checkpoint_label(checkpoint: str | Path) -> str:
    """`model_label` of a checkpoint: dataset, model kind, and dense or its pruning targets."""
    from deeplight.model import checkpoint as ckpt_io

    ck = ckpt_io.load_checkpoint(checkpoint)  # any other file: "not a deeplight checkpoint"
    cfg = json.loads(ck.get("config") or "{}")
    pruned = bool((ck.get("extra") or {}).get("masks"))
    return model_label(ck.get("dataset", ""), (ck.get("spec") or {}).get("kind", "model"),
                       cfg.get("prune") if pruned else None)


def _log_evaluation_to(log: Any, metrics: dict, plots_dir: str | Path | None, paths_as_params: bool = True) -> None:
    """The evaluation on an open run: metrics, tags (with the host the latency was measured on), the evaluated
    data as the run's dataset input, evaluation.json and plots. `paths_as_params=False` (a run that logs a
    model, whose params MLflow copies onto the LoggedModel): the checkpoint and data paths become tags."""
    from deeplight.evaluation.evaluate import flat_metrics

    paths = {k: metrics[k] for k in ("checkpoint", "data_dir", "input") if k in metrics}
    log.log_params({"split": metrics["split"]} if "split" in metrics else {})
    if paths_as_params:
        log.log_params(paths)
    else:
        log.set_tags({f"deeplight.{k}": v for k, v in paths.items()})
    log.set_tags({k: metrics[k] for k in ("dataset", "feature_map_fingerprint", "data_fingerprint",
                                          "eval_data_fingerprint", "code_version", "pruned") if k in metrics})
    if metrics.get("latency_us"):
        log.set_tags(machine_tags())
    log.log_metrics(flat_metrics(metrics))
    if getattr(log, "client", None) is not None and metrics.get("data_dir") and metrics.get("split"):
        with contextlib.suppress(DeeplightError, OSError):  # the data may be gone (a temp folder): no input then
            log_splits(log.client, log.run_id, metrics["data_dir"], (metrics["split"],),
                       source=metrics.get("input"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "evaluation.json"
        path.write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str))
        log.log_artifact(path)
    if plots_dir is not None and Path(plots_dir).is_dir():
        for png in sorted(Path(plots_dir).glob("*.png")):
            log.log_artifact(png, "plots")


# --- registering -----------------------------------------------------------------------------------------

def version_tags(metrics: dict, parent_run_id: str | None, extra: dict | None) -> dict[str, str]:
    """What a registered version carries: evaluation, sparsity targets, fingerprints, code, parent run."""
    from deeplight.evaluation.evaluate import flat_metrics

    tags: dict[str, Any] = {f"{k}": repr(v) for k, v in flat_metrics(metrics).items()}
    for k, v in (metrics.get("prune_targets") or {}).items():
        tags[f"sparsity_target_{k}"] = repr(float(v))
    tags |= {"pruned": str(bool(metrics.get("pruned"))).lower(), "eval_split": metrics.get("split", ""),
             "dataset": metrics.get("dataset", ""),
             "feature_map_fingerprint": metrics.get("feature_map_fingerprint", ""),
             "data_fingerprint": metrics.get("data_fingerprint", ""),
             f"{metrics.get('split', 'test')}_data_fingerprint": metrics.get("eval_data_fingerprint", ""),
             "code_version": metrics.get("code_version", ""), "parent_run_id": parent_run_id or "",
             "model_kind": metrics.get("model_kind", "")}
    tags |= {f"served_{k}": repr(round(float(v), 3)) for k, v in (metrics.get("served") or {}).items()}
    if metrics.get("served"):
        tags |= machine_tags()
    tags |= {str(k): v for k, v in (extra or {}).items()}
    return {k: redact(v) for k, v in tags.items()}


def _pip_requirements() -> list[str]:
    return [f"{p}=={metadata.version(p)}" for p in SERVING_PACKAGES]


def check_metrics_of(metrics: dict, ckpt: Path, source: str | None = None) -> None:
    """Refuse an evaluation of another checkpoint: the version's tags are the promotion gate's inputs, so they
    must be this model's numbers. Identity is the sha256 of the checkpoint file that `evaluate` recorded, so any
    path to the same file (relative, `..`, a symlink, a copy) passes. An evaluation JSON without it (written
    before deeplight recorded it) is refused too: it cannot say which model it measured."""
    from deeplight.base.files import file_sha256

    where = source or "the metrics given"
    got, want = metrics.get("checkpoint_sha256"), file_sha256(ckpt)
    if not got:
        raise DeeplightError(f"{where}: no checkpoint_sha256 field, so it cannot show it is the evaluation of "
                             f"{ckpt} (it was written by an older `deeplight evaluate`); evaluate the model again")
    if got != want:
        raise DeeplightError(f"{where} is the evaluation of another checkpoint ({metrics.get('checkpoint', '?')}, "
                             f"sha256 {got[:12]}...) than {ckpt} (sha256 {want[:12]}...); register a model with "
                             "its own `deeplight evaluate` JSON")


def register_model(checkpoint: str, data_dir: str, name: str, metrics: dict | None = None,
                   parent_run_id: str | None = None, tags: dict | None = None, dense: str | None = None,
                   metrics_file: str | None = None) -> dict:
    """Log the checkpoint as a raw-rows pyfunc in a `register` run, register it under `name` as a new
    version with alias `challenger` and version tags. `metrics`: its evaluation on the test split
    (`evaluate_model`; checked to be of this very checkpoint, `check_metrics_of`; `metrics_file` names it in
    errors); evaluated here when None. The registered model's served latency is measured (and, with
    `dense`, the dense checkpoint's served the same way, side by side: `served_dense_*` tags).
    Returns {"name", "version", "run_id", "model_uri", ...}."""
    from deeplight.model import checkpoint as ckpt_io
    from deeplight.serve.export import compact_checkpoint
    from deeplight.data.loader import read_manifest
    from deeplight.evaluation.evaluate import evaluate_model, resolve_checkpoint
    from deeplight.data.feature_map import FeatureMap
    from deeplight.data.schema import get_schema

    if not name or not isinstance(name, str):
        raise DeeplightError("register: a model name is required")
    ckpt = resolve_checkpoint(checkpoint)
    manifest = read_manifest(data_dir)
    fmap_path = Path(data_dir) / "feature_map.json"
    if not fmap_path.is_file():
        raise DeeplightError(f"{data_dir}: no feature_map.json; register needs the hashed dataset the model was "
                             "trained on (written by `deeplight hash`)")
    fmap = FeatureMap.load(fmap_path)
    fp = fmap.fingerprint()
    ck = ckpt_io.load(ckpt)
    if ck.get("feature_map_fingerprint") != fp or manifest.get("feature_map_fingerprint") != fp:
        raise DeeplightError(f"{ckpt} was trained with another feature map than {fmap_path}; register it with "
                             "the hashed dataset it was trained on")
    if metrics is not None and metrics.get("feature_map_fingerprint", fp) != fp:
        raise DeeplightError("register: the metrics given are of a model with another feature map")
    if metrics is not None:  # before any MLflow run exists: a refusal leaves nothing behind
        check_metrics_of(metrics, ckpt, metrics_file)
        metrics = {**metrics, "checkpoint": str(ckpt)}  # the same file: one `checkpoint` param on the run

    mlflow.set_tracking_uri(tracking_uri())
    tracker = MlflowTracker(parent_run_id=parent_run_id, data_dir=data_dir)
    label = checkpoint_label(ckpt)  # what the model is: its LoggedModel's name
    hyper = Config.from_dict(json.loads(ck.get("config") or "{}")).flat(MODEL_SECTIONS)
    with tempfile.TemporaryDirectory() as tmp:
        plots = None
        if metrics is None:
            plots = Path(tmp) / "plots"
            metrics = evaluate_model(str(ckpt), str(data_dir), "test", plots_dir=str(plots))
        art = Path(tmp) / "artifacts"
        compact_checkpoint(ckpt, art)
        shutil.copyfile(fmap_path, art / ARTIFACT_FILES["feature_map"])
        artifacts = {k: str(art / f) for k, f in ARTIFACT_FILES.items()}
        RawRowsModel().load(artifacts["compact"], artifacts["feature_map"])  # fail here, not in the registry
        run_tags = {"stage": "register", "registered_model": name, "dataset": fmap.dataset,
                    "feature_map_fingerprint": fp}
        with tracker.run(run_label("register", name, label), tags=run_tags) as log:
            # The run's params are the model's settings: MLflow copies them onto the LoggedModel.
            _log_evaluation_to(log, metrics, plots, paths_as_params=False)
            log.log_params({**hyper, "registered_model": name})
            log.set_tags({"deeplight.checkpoint": str(ckpt)})
            with mlflow.start_run(run_id=log.run_id, nested=mlflow.active_run() is not None):
                code = Path(tmp) / "deeplight_model.py"
                code.write_text(MODEL_CODE)
                info = mlflow.pyfunc.log_model(
                    name=label, python_model=str(code), artifacts=artifacts,
                    code_paths=[str(Path(__file__).resolve().parents[1])],
                    signature=signature(get_schema(fmap.dataset)), input_example=input_example(fmap),
                    pip_requirements=_pip_requirements(), registered_model_name=name)
            served = served_latency(info.model_uri, fmap)
            if dense is not None:  # the dense model as the same kind of pyfunc, saved locally, timed alike
                dense_dir = Path(tmp) / "dense"
                compact_checkpoint(resolve_checkpoint(dense), dense_dir / "artifacts", exports=False)
                shutil.copyfile(fmap_path, dense_dir / "artifacts" / ARTIFACT_FILES["feature_map"])
                mlflow.pyfunc.save_model(
                    str(dense_dir / "model"), python_model=str(code),
                    code_paths=[str(Path(__file__).resolve().parents[1])],
                    artifacts={k: str(dense_dir / "artifacts" / ARTIFACT_FILES[k]) for k in ("compact", "feature_map")},
                    signature=signature(get_schema(fmap.dataset)), pip_requirements=_pip_requirements())
                served |= {f"dense_{k}": v for k, v in served_latency(str(dense_dir / "model"), fmap).items()}
            log.log_metrics({f"served_{k}": v for k, v in served.items()})
            run_id = log.run_id
    metrics = {**metrics, "served": served}
    version = str(info.registered_model_version)
    c = client()
    c.set_registered_model_alias(name, CHALLENGER, version)
    vtags = version_tags(metrics, parent_run_id, tags)
    for k, v in vtags.items():
        c.set_model_version_tag(name, version, k, v)
    return {"name": name, "version": version, "run_id": run_id, "alias": CHALLENGER,
            "model_uri": f"models:/{name}/{version}", "logged_model_uri": info.model_uri, "tags": vtags}


# --- the served model's latency ----------------------------------------------------------------------------

SERVED_BATCHES = (1, 1000)  # raw rows per call: one request, and a large batch


def served_latency(model_uri: str, fmap: Any, calls_1row: int = 300, calls_batch: int = 20) -> dict[str, float]:
    """What a client of the registered model waits for: `mlflow.pyfunc.load_model(uri).predict(rows)` on raw rows
    (MLflow's wrapper, validation, ids, engine), 1 row and 1,000 rows per call, median of `calls`, engine BLAS at
    one thread (the pyfunc's default). Tagged on the version with the host's CPU and load (see `machine_tags`)."""
    import time

    from deeplight.serve.rows import example_rows

    model = mlflow.pyfunc.load_model(model_uri)
    rows = example_rows(fmap, max(SERVED_BATCHES), seed=0)
    out: dict[str, float] = {}
    for batch in SERVED_BATCHES:
        frame = rows.iloc[:batch].reset_index(drop=True)
        model.predict(frame)  # warm-up: numba's compiled code loads on first use
        times = []
        for _ in range(calls_1row if batch == 1 else calls_batch):
            t0 = time.perf_counter()
            model.predict(frame)
            times.append(time.perf_counter() - t0)
        median = float(np.median(times))
        out[f"latency_us_{batch}row" if batch == 1 else f"latency_us_{batch}rows"] = median * 1e6
        out[f"rows_per_s_{batch}"] = batch / median
    return out


def machine_tags() -> dict[str, str]:
    """Where a latency was measured: CPU model, cores, load average (latencies differ 2x between hosts)."""
    import os
    import platform

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"host.cpu": cpu, "host.cores": str(os.cpu_count()), "host.load_avg_1m": f"{load[0]:.2f}"}


# --- promotion -------------------------------------------------------------------------------------------

def _by_alias(c: Any, name: str, alias: str) -> Any:
    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(e).lower() \
                or "does not exist" in str(e).lower():
            return None
        raise


def _number(tags: dict[str, str], key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return None


def _write_decision(c: Any, name: str, version: str, tags: dict[str, str], current: dict[str, str]) -> bool:
    """Set the tags whose value differs (a repeated decision changes nothing); whether any was set."""
    changed = {k: v for k, v in tags.items() if current.get(k) != v}
    for k, v in changed.items():
        c.set_model_version_tag(name, version, k, v)
    return bool(changed)


def promote(name: str, tolerance: float = _PROMOTE.tolerance, latency_slo_us: float | None = _PROMOTE.latency_slo_us
            ) -> dict:
    """Move `champion` to the `challenger` version if it passes the gate; the decision is tagged and returned.

    Gate: test AUC >= champion's test AUC - tolerance (same dataset, feature map and test data, else
    DeeplightError), and batch-1 latency <= latency_slo_us when given. No champion yet: the AUC check is
    skipped. Idempotent: a challenger that already is the champion, or a repeated decision, changes nothing.
    """
    if not (isinstance(tolerance, (int, float)) and tolerance >= 0 and math.isfinite(tolerance)):
        raise DeeplightError(f"promote: tolerance must be a number >= 0, got {tolerance!r}")
    if latency_slo_us is not None and not latency_slo_us > 0:
        raise DeeplightError(f"promote: latency SLO must be > 0 microseconds, got {latency_slo_us!r}")
    c = client()
    try:
        c.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise DeeplightError(f"no registered model {name!r} at {redact(tracking_uri())}; "
                             "run `deeplight register` first") from None
    challenger = _by_alias(c, name, CHALLENGER)
    if challenger is None:
        raise DeeplightError(f"model {name!r} has no version with alias {CHALLENGER!r}; run `deeplight register`")
    champion = _by_alias(c, name, CHAMPION)
    new, old = str(challenger.version), (str(champion.version) if champion is not None else None)
    result: dict[str, Any] = {"name": name, "challenger": new, "champion_before": old, "tolerance": tolerance,
                              "latency_slo_us": latency_slo_us}
    if old == new:
        return {**result, "decision": "unchanged", "promoted": False, "changed": False, "champion": old,
                "reasons": [f"version {new} already is the champion"]}
    ct, pt = dict(challenger.tags), dict(champion.tags) if champion is not None else {}
    decision_tags = {"promotion.champion_before": old or "none", "promotion.tolerance": repr(float(tolerance)),
                     "promotion.latency_slo_us": "none" if latency_slo_us is None else repr(float(latency_slo_us))}

    refusal = None
    if champion is not None:
        if ct.get("dataset") != pt.get("dataset"):
            refusal = (f"version {new} was registered from dataset {ct.get('dataset')!r}, the champion (version "
                       f"{old}) from {pt.get('dataset')!r}")
        elif ct.get("feature_map_fingerprint") != pt.get("feature_map_fingerprint"):
            refusal = (f"version {new} uses another feature map ({ct.get('feature_map_fingerprint', '?')[:12]}) "
                       f"than the champion, version {old} ({pt.get('feature_map_fingerprint', '?')[:12]}): its "
                       "scores are not comparable; register it under another name")
        elif ct.get("test_data_fingerprint") != pt.get("test_data_fingerprint"):
            refusal = (f"version {new} was evaluated on other test data than the champion (version {old}); "
                       "their AUCs are not comparable")
    if refusal:
        _write_decision(c, name, new, {**decision_tags, "promotion.decision": "refused",
                                       "promotion.reasons": refusal}, ct)
        raise DeeplightError(f"promote {name}: refused: {refusal}")

    passed, reasons = True, []
    auc = _number(ct, "test_auc")
    if auc is None:
        passed = False
        reasons.append(f"version {new} has no test_auc tag (register it with a test-split evaluation)")
    elif champion is None:
        reasons.append(f"no champion yet; test AUC {auc:.6f}")
    else:
        best = _number(pt, "test_auc")
        if best is None:
            reasons.append(f"champion version {old} has no test_auc; AUC not compared")
        elif auc + _AUC_SLACK >= best - tolerance:
            reasons.append(f"test AUC {auc:.6f} vs champion version {old} {best:.6f} (delta {auc - best:+.6f}, "
                           f"tolerance {tolerance})")
        else:
            passed = False
            reasons.append(f"test AUC {auc:.6f} is {best - auc:.6f} below champion version {old}'s {best:.6f} "
                           f"(tolerance {tolerance})")
    if latency_slo_us is not None:
        lat = _number(ct, SERVED_TAG)
        if lat is None:
            passed = False
            reasons.append(f"version {new} has no {SERVED_TAG} tag to check the {latency_slo_us} us SLO "
                           "(register it again: registration measures the served model)")
        elif lat <= latency_slo_us:
            reasons.append(f"served latency for one raw row {lat:.1f} us within the {latency_slo_us} us SLO")
        else:
            passed = False
            reasons.append(f"served latency for one raw row {lat:.1f} us exceeds the {latency_slo_us} us SLO")
    decision = "promoted" if passed else "rejected"
    if passed:
        c.set_registered_model_alias(name, CHAMPION, new)
    tagged = _write_decision(c, name, new, {**decision_tags, "promotion.decision": decision,
                                            "promotion.reasons": "; ".join(reasons)}, ct)
    return {**result, "decision": decision, "promoted": passed, "changed": passed or tagged,
            "champion": new if passed else old, "reasons": reasons}
