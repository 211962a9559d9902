"""What each step of the KFP pipeline does, as plain functions of paths and strings.

The components in `components/` are thin KFP wrappers around these functions: they pass their artifact paths
and parameters here and copy the returned values to their outputs. Nothing here imports kfp, so a step can be
run (and debugged) without KFP:

    from deeplight.steps import pipeline as steps
    cfg_json = steps.pipeline_config(dataset="criteo", overrides='{"model.dnn": [16]}').to_json()
    parent = steps.start_pipeline_run(cfg_json, run_name="try", kfp_run_id="local-1")
    steps.ingest_step(["data/raw.txt"], cfg_json, "out/ingested", parent)
    steps.hash_step("out/ingested", cfg_json, "out/hashed", parent)
    steps.train_step("out/hashed", cfg_json, "out/dense", parent)
    steps.finish_pipeline_run("local-1", "SUCCEEDED")

MLflow: `start_pipeline_run` opens one parent run per pipeline run (tagged with the KFP run id); every step
opens a child run of it (tag `deeplight.step`) with its params, metrics and artifacts; the evaluate step also
copies its headline metrics onto the parent as `<variant>_<metric>` so that pipeline runs compare side by side
in the MLflow runs table; `finish_pipeline_run` (the pipeline's exit handler) closes the parent as FINISHED or
FAILED. A step failing on bad input (`DeeplightError`) records `<step>: <message>` in the parent's
`deeplight.error` tag, prints `deeplight: error: <message>` and exits with status 2 (no stack trace), like
the CLI. The tracking store comes from the environment (`deeplight.ops.tracking.tracking_uri`).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator

from deeplight.base.config import Config
from deeplight.base.errors import DeeplightError
from deeplight.base.redact import redact

ERROR_TAG = "deeplight.error"
STEP_TAG = "deeplight.step"
VARIANT_TAG = "deeplight.variant"
KFP_RUN_TAG = "kfp.run_id"
RUN_NAME_TAG = "deeplight.run_name"
KIND_TAG = "deeplight.kind"
PIPELINE_KIND = "pipeline"
REGISTERED_TAG = "deeplight.registered"  # name/version registered by this pipeline run


# --- configuration ---------------------------------------------------------------------------------------

def parse_split(text: str) -> tuple[float, float, float]:
    """'0.8,0.1,0.1' -> (0.8, 0.1, 0.1); a clear error otherwise."""
    try:
        parts = tuple(float(x) for x in str(text).split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or any(p < 0 for p in parts) or abs(sum(parts) - 1.0) > 1e-6:
        raise DeeplightError(f"split: want three non-negative fractions summing to 1 like 0.8,0.1,0.1, got {text!r}")
    return parts  # type: ignore[return-value]


def pipeline_config(dataset: str | None = None, split: str | None = None, split_mode: str | None = None,
                    seed: int | None = None, min_count: int | None = None, buckets: int | None = None,
                    epochs: int | None = None, dnn_sparsity: float | None = None,
                    field_sparsity: float | None = None, embedding_sparsity: float | None = None,
                    prune_mode: str | None = None, ramp_epochs: float | None = None,
                    finetune_epochs: int | None = None, overrides: str | dict | None = None) -> Config:
    """The one Config of a pipeline run, from its typed parameters (None: the Config default) plus `overrides`,
    a JSON object of dotted settings (`{"model.dnn": [16], "train.batch_size": 512}`) applied last.

    `buckets` > 0 selects stable hashing into that many buckets per field, else a train-only vocabulary with
    `min_count`."""
    cfg = Config()
    hashing: dict[str, Any] = {}
    if buckets:
        hashing = {"features.buckets": int(buckets), "features.min_count": None}
    elif min_count is not None:
        hashing = {"features.min_count": int(min_count), "features.buckets": None}
    cfg = cfg.replace(**{
        "data.dataset": dataset, "data.split": parse_split(split) if split is not None else None,
        "data.split_mode": split_mode, "data.seed": seed, "train.seed": seed, "train.epochs": epochs,
        "prune.dnn": dnn_sparsity, "prune.field": field_sparsity, "prune.embedding": embedding_sparsity,
        "prune.mode": prune_mode, "prune.ramp_epochs": ramp_epochs, "prune.finetune_epochs": finetune_epochs,
    })
    if hashing:  # replace() ignores None values, so clearing the other hashing setting goes through a dict
        d = cfg.to_dict()
        d["features"].update({k.split(".", 1)[1]: v for k, v in hashing.items()})
        cfg = Config.from_dict(d)
    if overrides:
        if isinstance(overrides, str):
            try:
                overrides = json.loads(overrides)
            except json.JSONDecodeError as e:
                raise DeeplightError(f"config overrides: not valid JSON ({e}): {overrides!r}") from None
        if not isinstance(overrides, dict):
            raise DeeplightError(f"config overrides: want a JSON object of dotted settings, got {overrides!r}")
        cfg = cfg.replace(**overrides)
    check_config(cfg)
    return cfg


def check_config(cfg: Config) -> None:
    """Fail before any step runs on settings no step could use."""
    from deeplight.data.schema import get_schema

    get_schema(cfg.data.dataset)  # raises for an unknown dataset
    if cfg.data.split_mode not in ("random", "sequential"):
        raise DeeplightError(f"split_mode: want random or sequential, got {cfg.data.split_mode!r}")
    if (cfg.features.buckets is None) == (cfg.features.min_count is None):
        raise DeeplightError("hashing: set exactly one of buckets (> 0) or min_count")
    if cfg.train.epochs < 1:
        raise DeeplightError(f"epochs: want at least 1, got {cfg.train.epochs}")
    for name in ("dnn", "field", "embedding"):
        value = getattr(cfg.prune, name)
        if not 0 <= value < 1:
            raise DeeplightError(f"{name} sparsity: want a number in [0, 1), got {value}")
    if cfg.prune.mode not in ("unstructured", "structured"):
        raise DeeplightError(f"prune mode: want unstructured or structured, got {cfg.prune.mode!r}")


def _config(config_json: str) -> Config:
    try:
        return Config.from_dict(json.loads(config_json))
    except (json.JSONDecodeError, TypeError) as e:
        raise DeeplightError(f"config_json: not a deeplight config ({e})") from None


# --- MLflow: parent and child runs -----------------------------------------------------------------------

def _tracker(parent_run_id: str | None, step: str, variant: str | None = None, name: str | None = None,
             data_dir: str | None = None, system_metrics: bool = False):
    """An MlflowTracker whose runs are children of `parent_run_id`, carry the step's tags and, with `name`,
    that run name; `data_dir`: the hashed dataset logged as the runs' inputs; `system_metrics` for training."""
    from deeplight.ops.tracking import MlflowTracker

    step_tags = {STEP_TAG: step, **({VARIANT_TAG: variant} if variant else {})}

    class StepTracker(MlflowTracker):
        def run(self, run_name: str, resume_id: str | None = None, tags: dict[str, Any] | None = None):
            return super().run(name or run_name, resume_id=resume_id, tags={**(tags or {}), **step_tags})

    return StepTracker(parent_run_id=parent_run_id or None, data_dir=data_dir, system_metrics=system_metrics)


def prune_label(cfg: Config) -> str:
    """The pruning part of a run name: the targets, or the accuracy budget when the targets are searched."""
    from deeplight.ops.tracking import sparsity_label

    if cfg.prune.auto:
        return f"auto-max-auc-loss{cfg.prune.max_auc_loss:g}".replace(".", "p")
    return sparsity_label(cfg.prune)


def pipeline_run_name(cfg: Config, suffix: str = "", when: float | None = None) -> str:
    """A parent run's name from what it trains: `criteo-deepfwfm-dnn90-field90-emb40-20261206-2253-<suffix>`."""
    from deeplight.ops.tracking import run_label

    return run_label(cfg.data.dataset, cfg.model.kind, prune_label(cfg), when=when, suffix=suffix)


def start_pipeline_run(config_json: str, run_name: str = "", kfp_run_id: str = "",
                       params: dict[str, Any] | None = None) -> str:
    """Open the parent MLflow run of one pipeline run; returns its id. Params: the whole config (flat) plus
    the pipeline's own parameters (`params`, e.g. inputs and model name; secrets redacted). Its name: `run_name`,
    else `pipeline_run_name` with the KFP run id's first 8 characters."""
    from deeplight.base.provenance import code_version
    from deeplight.ops.tracking import MlflowRunLog, MlflowTracker

    cfg = _config(config_json)
    tracker = MlflowTracker()
    name = run_name or pipeline_run_name(cfg, suffix=kfp_run_id[:8])
    run = tracker.client.create_run(tracker.experiment_id, run_name=name, tags={
        KIND_TAG: PIPELINE_KIND, KFP_RUN_TAG: kfp_run_id, RUN_NAME_TAG: name, "code_version": code_version(),
        "dataset": cfg.data.dataset})
    log = MlflowRunLog(tracker.client, run.info.run_id)
    log.log_params({**cfg.flat(), **{f"pipeline.{k}": v for k, v in (params or {}).items()}})
    return run.info.run_id


def find_pipeline_run(kfp_run_id: str = "", run_name: str = ""):
    """The parent run of a pipeline run, by KFP run id or by run name (newest first); None when absent."""
    from deeplight.ops.tracking import client, experiment_id

    c = client()
    key, value = (KFP_RUN_TAG, kfp_run_id) if kfp_run_id else (RUN_NAME_TAG, run_name)
    value = value.replace("'", "")
    runs = c.search_runs([experiment_id(c)], f"tags.`{KIND_TAG}` = '{PIPELINE_KIND}' and tags.`{key}` = '{value}'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def finish_pipeline_run(kfp_run_id: str, state: str, error_message: str = "") -> str | None:
    """Close the parent run of KFP run `kfp_run_id`: FINISHED when `state` is SUCCEEDED, else FAILED (keeping
    the failing step's own message when it left one). Returns the parent run id (None: no step ever started)."""
    from deeplight.ops.tracking import client

    run = find_pipeline_run(kfp_run_id=kfp_run_id)
    if run is None:
        return None
    c = client()
    ok = state.upper() in ("SUCCEEDED", "SUCCESS", "FINISHED")
    if not ok and ERROR_TAG not in run.data.tags:
        c.set_tag(run.info.run_id, ERROR_TAG, error_message or f"pipeline {state.lower()}")
    c.set_terminated(run.info.run_id, status="FINISHED" if ok else "FAILED")
    return run.info.run_id


@contextlib.contextmanager
def step(name: str, parent_run_id: str) -> Iterator[None]:
    """Run a step's body; on failure record `<step>: <message>` on the parent run. A DeeplightError (bad input
    or setting) prints `deeplight: error: <message>` and exits with status 2, without a stack trace."""
    try:
        yield
    except DeeplightError as e:
        _record_error(parent_run_id, f"{name}: {e}")
        print(f"deeplight: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except Exception as e:
        _record_error(parent_run_id, f"{name}: {type(e).__name__}: {e}")
        raise


def _record_error(parent_run_id: str, message: str) -> None:
    if not parent_run_id:
        return
    try:
        from deeplight.ops.tracking import client, redact

        client().set_tag(parent_run_id, ERROR_TAG, redact(message)[:4000])
    except Exception as e:  # the step's own error matters more than a tracking failure
        print(f"deeplight: could not record the error on MLflow run {parent_run_id}: {e}", file=sys.stderr)


# --- steps -----------------------------------------------------------------------------------------------

def ingest_step(input_uris: list[str], config_json: str, out_dir: str, parent_run_id: str) -> dict[str, Any]:
    """Raw files (local or s3://) -> typed Parquet splits in out_dir; child run `ingest`."""
    from deeplight.data.ingest import ingest
    from deeplight.base.allocators import tune_allocators

    tune_allocators()
    with step("ingest", parent_run_id):
        cfg = _config(config_json)
        if isinstance(input_uris, str):
            input_uris = [input_uris]
        if not input_uris:
            raise DeeplightError("ingest: no input files given")
        with _tracker(parent_run_id, "ingest").run("ingest") as log:
            log.log_params({"dataset": cfg.data.dataset, "inputs": ",".join(input_uris),
                            "split": ",".join(map(str, cfg.data.split)), "split_mode": cfg.data.split_mode,
                            "seed": cfg.data.seed})
            report = ingest(cfg.data.dataset, list(input_uris), out_dir, split=tuple(cfg.data.split),
                            split_mode=cfg.data.split_mode, seed=cfg.data.seed)
            log.log_metrics({"rows_read": report["read"], "rows_written": report["written"],
                             "rows_quarantined": report["quarantined"],
                             **{f"rows_{k}": v for k, v in report["splits"].items()}})
            log.log_artifact(Path(out_dir) / "report.json")
        return report


def hash_step(ingested_dir: str, config_json: str, out_dir: str, parent_run_id: str) -> dict[str, Any]:
    """Fit the feature map on the train split and write feature ids; child run `hash_features`."""
    from deeplight.data.hashing import hash_dataset
    from deeplight.base.allocators import tune_allocators
    from deeplight.ops.tracking import client, log_splits

    tune_allocators()
    with step("hash_features", parent_run_id):
        cfg = _config(config_json)
        with _tracker(parent_run_id, "hash_features").run("hash_features") as log:
            log.log_params({"features.min_count": cfg.features.min_count, "features.buckets": cfg.features.buckets})
            manifest = hash_dataset(ingested_dir, out_dir, buckets=cfg.features.buckets,
                                    min_count=cfg.features.min_count)
            log.log_metrics({"fields": len(manifest["field_sizes"]), "total_ids": sum(manifest["field_sizes"]),
                             **{f"rows_{k}": v for k, v in manifest["rows"].items()}})
            log.set_tags({"feature_map_fingerprint": manifest.get("feature_map_fingerprint", "")})
            log.log_artifact(Path(out_dir) / "manifest.json")
            log_splits(log.client, log.run_id, out_dir)
        if parent_run_id:  # the parent run's Datasets too: what this pipeline run trained and tested on
            log_splits(client(), parent_run_id, out_dir)
        return manifest


def train_step(hashed_dir: str, config_json: str, out_dir: str, parent_run_id: str) -> dict[str, Any]:
    """Train the dense model; child run `train` (per-epoch metrics, checkpoint, learning curve)."""
    from deeplight.model.train import train

    from deeplight.ops.tracking import run_label

    with step("train", parent_run_id):
        cfg = _config(config_json)
        return train(hashed_dir, out_dir, cfg, run_name=run_label("train", cfg.data.dataset, cfg.model.kind),
                     tracker=_tracker(parent_run_id, "train", "dense", data_dir=hashed_dir, system_metrics=True))


def prune_step(dense_dir: str, hashed_dir: str, config_json: str, out_dir: str,
               parent_run_id: str) -> dict[str, Any]:
    """Prune the dense model to the fastest operating point within tolerance of it (prune.auto, the default;
    the candidates' runs are children too) or to cfg.prune's targets, and fine-tune; child run `prune`."""
    from deeplight.model.prune import prune_as_configured

    from deeplight.ops.tracking import run_label

    with step("prune", parent_run_id):
        cfg = _config(config_json)
        return prune_as_configured(
            Path(dense_dir) / "best.pt", hashed_dir, out_dir, cfg,
            run_name=run_label("prune", cfg.data.dataset, cfg.model.kind, prune_label(cfg)),
            tracker=_tracker(parent_run_id, "prune", "pruned", data_dir=hashed_dir, system_metrics=True))


def evaluate_step(model_dir: str, hashed_dir: str, variant: str, out_dir: str,
                  parent_run_id: str) -> dict[str, Any]:
    """Score a model on the test split as it is served (compact engine): AUC, logloss, latency, size, sparsity;
    child run `evaluate-<variant>-<what the model is>-<date>`, open while the evaluation runs. Its flat metrics (`test_auc`, `latency_us_b1`, `model_bytes`, ...) are also
    copied onto the parent run as `<variant>_<metric>`. Writes out_dir/metrics.json and out_dir/plots/."""
    from deeplight.evaluation.evaluate import evaluate_model, flat_metrics
    from deeplight.ops.registry import checkpoint_label, evaluate_tracked
    from deeplight.ops.tracking import run_label

    with step(f"evaluate-{variant}", parent_run_id):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        ckpt = str(Path(model_dir) / "best.pt")
        name = run_label(f"evaluate-{variant}", checkpoint_label(ckpt))
        metrics = evaluate_tracked(
            lambda: evaluate_model(ckpt, hashed_dir, split="test", out_json=str(out / "metrics.json"),
                                   plots_dir=str(out / "plots")),
            str(out / "plots"), _tracker(parent_run_id, "evaluate", variant, name=name))
        if parent_run_id:
            from deeplight.ops.tracking import MlflowRunLog, client

            MlflowRunLog(client(), parent_run_id).log_metrics(
                {f"{variant}_{k}": v for k, v in flat_metrics(metrics).items()})
        return metrics


def register_step(model_dir: str, hashed_dir: str, evaluation_dir: str, model_name: str, parent_run_id: str,
                  variant: str = "pruned", dense_dir: str | None = None) -> dict[str, Any]:
    """Register the model in the MLflow registry (alias `challenger`) with its evaluation metrics and its served
    latency (beside the dense model's, from `dense_dir`, when given)."""
    from deeplight.base.files import read_json
    from deeplight.ops.registry import register_model

    with step("register", parent_run_id):
        metrics = read_json(Path(evaluation_dir) / "metrics.json")
        info = register_model(str(Path(model_dir) / "best.pt"), hashed_dir, model_name, metrics=metrics,
                              parent_run_id=parent_run_id or None, tags={VARIANT_TAG: variant},
                              dense=str(Path(dense_dir) / "best.pt") if dense_dir else None)
        if parent_run_id:  # the parent run's table gets the served latencies too, dense and pruned side by side
            from deeplight.ops.tracking import MlflowRunLog, client

            served = {k: float(v) for k, v in info.get("tags", {}).items() if k.startswith("served_")}
            MlflowRunLog(client(), parent_run_id).log_metrics(served)
        if parent_run_id:
            link_registered_version(parent_run_id, info)
        return info


def link_registered_version(parent_run_id: str, info: dict[str, Any]) -> None:
    """The parent run names the version it registered: tags `deeplight.registered` (NAME/VERSION) and
    `deeplight.registered.url` (the version's page in the MLflow UI), and a run description linking to it."""
    from deeplight.ops.tracking import MlflowRunLog, client, tracking_uri

    name, version = info["name"], info["version"]
    page = f"#/models/{name}/versions/{version}"
    uri = redact(tracking_uri())
    url = f"{uri.rstrip('/')}/{page}" if uri.startswith(("http://", "https://")) else page
    note = (f"Registered [{name} version {version}]({page}) (alias `{info.get('alias', '')}`) from this run's "
            "pruned model.")
    MlflowRunLog(client(), parent_run_id).set_tags({
        REGISTERED_TAG: f"{name}/{version}", f"{REGISTERED_TAG}.alias": info.get("alias", ""),
        f"{REGISTERED_TAG}.url": url, "mlflow.note.content": note})


def promote_step(model_name: str, tolerance: float, latency_slo_us: float, parent_run_id: str) -> dict[str, Any]:
    """Promote `challenger` to `champion` when it passes the gate (AUC within `tolerance` of the champion,
    latency within the SLO when > 0)."""
    from deeplight.ops.registry import promote

    with step("promote", parent_run_id):
        decision = promote(model_name, tolerance=tolerance, latency_slo_us=latency_slo_us or None)
        if parent_run_id:
            from deeplight.ops.tracking import client

            client().set_tag(parent_run_id, "deeplight.promotion", json.dumps(decision, default=str)[:4000])
        return decision
