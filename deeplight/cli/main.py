"""`deeplight` command line: one subcommand per pipeline step, each with --help.

Heavy modules (torch, mlflow, kfp) are imported inside the handlers so that `--help` stays fast.
A `DeeplightError` prints as `deeplight: error: ...` with exit status 2, never as a stack trace.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from typing import Callable

import deeplight
from deeplight.base.errors import DeeplightError
from deeplight.base.redact import redact
from deeplight.base.config import MODEL_SECTIONS
from deeplight.cli.options import add_set, config_from, setting


def _split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--split wants three numbers like 0.8,0.1,0.1, got {text!r}") from None
    if len(parts) != 3 or any(p < 0 for p in parts) or abs(sum(parts) - 1.0) > 1e-6:
        raise argparse.ArgumentTypeError(f"--split wants three non-negative fractions summing to 1, got {text!r}")
    return parts  # type: ignore[return-value]


def _range(kind: type) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        from deeplight.ops.sweep.space import parse_range

        try:
            return parse_range(text, kind)
        except DeeplightError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _names(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


def _device(sp: argparse.ArgumentParser, what: str = "the model") -> None:
    setting(sp, "--device", "train.device", choices=["auto", "cpu", "cuda"],
            help=f"where torch trains {what}: auto = a CUDA GPU when torch sees one, else the CPU; --set train.device=cuda:N picks a GPU")


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


# --- handlers -------------------------------------------------------------------------------------------

def cmd_synth(a: argparse.Namespace) -> None:
    from deeplight.data.synth import synthesize

    _print_json(synthesize(a.dataset, rows=a.rows, seed=a.seed, out=a.out, truth_path=a.truth))


def _freeze_startup_objects() -> None:
    """Exempt the objects made so far (modules, numba's registries) from garbage collection: they live until exit,
    and walking them cost each data step's process ~0.1 s, mostly in the collection at interpreter shutdown."""
    gc.freeze()


def cmd_ingest(a: argparse.Namespace) -> None:
    from deeplight.base.allocators import tune_allocators
    from deeplight.data.numba_start import start_without_scipy

    start_without_scipy()  # this process runs only the parser's numba code: ~0.3 s less start-up
    from deeplight.data.ingest import ingest

    _freeze_startup_objects()
    tune_allocators()
    d = config_from(a).data
    report = ingest(d.dataset, a.input, a.out, split=d.split, split_mode=d.split_mode, seed=d.seed,
                    max_bad_fraction=d.max_bad_fraction)
    _print_json(report)


def cmd_hash(a: argparse.Namespace) -> None:
    from deeplight.data.hashing import hash_dataset
    from deeplight.base.allocators import tune_allocators

    _freeze_startup_objects()
    tune_allocators()
    f = config_from(a).features
    buckets = f.buckets
    _print_json(hash_dataset(a.input, a.out, buckets=buckets, min_count=None if buckets else f.min_count))


def cmd_apply_features(a: argparse.Namespace) -> None:
    from deeplight.data.feature_map import FeatureMap
    from deeplight.data.hashing import apply_feature_map
    from deeplight.base.allocators import tune_allocators

    _freeze_startup_objects()
    tune_allocators()
    _print_json(apply_feature_map(FeatureMap.load(a.feature_map), a.input, a.out))


def cmd_train(a: argparse.Namespace) -> None:
    from deeplight.base.config import Config
    from deeplight.model.train import train

    cfg = config_from(a, Config())
    result = train(a.data, a.out, cfg, tracker=_tracker(a, data_dir=a.data, system_metrics=True),
                   run_name=_run_name("train", a.data, cfg.model.kind))
    _print_json({k: v for k, v in result.items() if k != "history"})


def cmd_prune(a: argparse.Namespace) -> None:
    from deeplight.cli.options import overrides
    from deeplight.model.prune import config_for_pruning, prune_as_configured

    from deeplight.steps.pipeline import prune_label

    cfg = config_from(a, config_for_pruning(a.dense))
    given = overrides(a)
    if {"prune.dnn", "prune.field", "prune.embedding", "prune.mode"} & set(given) or "prune.max_auc_loss" in given:
        # explicit targets ask for those targets, --max-auc-loss for the search (--set prune.auto=... wins)
        cfg = cfg.replace(**{"prune.auto": given.get("prune.auto", "prune.max_auc_loss" in given)})
    result = prune_as_configured(a.dense, a.data, a.out, cfg,
                                 tracker=_tracker(a, data_dir=a.data, system_metrics=True),
                                 run_name=_run_name("prune", a.data, cfg.model.kind, prune_label(cfg)))
    _print_json({k: v for k, v in result.items() if k != "history"})


def cmd_compact(a: argparse.Namespace) -> None:
    from deeplight.serve.export import compact_checkpoint

    _print_json(compact_checkpoint(a.checkpoint, a.out, exports=not a.no_exports))


def cmd_pipeline(a: argparse.Namespace) -> None:
    from deeplight.cli.pipeline import main

    main(a)


def cmd_sweep(a: argparse.Namespace) -> None:
    from deeplight.cli.options import overrides
    from deeplight.ops.sweep import SweepSettings, brief, run_sweep

    cfg = config_from(a)
    settings = SweepSettings.from_config(cfg.sweep, storage=a.storage, grace_period=a.grace,
                                         experiment=cfg.registry.experiment)
    model_settings = {k: v for k, v in overrides(a).items() if k.split(".")[0] in MODEL_SECTIONS}
    summary = run_sweep(a.data, a.out, settings, overrides=model_settings, dense=a.dense,
                        finalize=not a.no_finalize, register=cfg.registry.model_name if a.register else None)
    _print_json(brief(summary))


def cmd_report(a: argparse.Namespace) -> None:
    from deeplight.evaluation.sweep_report import load_summary, write_report

    if a.summary:
        summary = load_summary(a.summary)
    else:
        from deeplight.ops.sweep import SweepSettings, collect, load_study, open_storage

        url = SweepSettings(storage=a.storage).storage_url()
        summary = collect(load_study(a.study, open_storage(url)))
    _print_json({k: str(v) for k, v in write_report(summary, a.out).items()})


def cmd_evaluate(a: argparse.Namespace) -> None:
    import shutil
    import tempfile
    from pathlib import Path

    from deeplight.evaluation import evaluate as ev

    if not a.data and not a.input:
        raise DeeplightError("evaluate: give --data HASHED_DIR (a split of a hashed dataset) or --input RAW_FILE")
    split = "test" if a.input else a.split  # raw files: every good row goes to the test split
    plots = a.plots or str(Path(a.out).with_suffix("")) + "_plots"
    registered = a.model.startswith("models:/") or _is_model_dir(a.model)
    if registered:  # a registered model (or its local copy): the compact engine and its own feature map
        from deeplight.ops.server import resolve_model

        model_dir, version = resolve_model(a.model)
        feature_map, label = str(model_dir / "feature_map.json"), version.replace("/", "-v")
        if a.feature_map:
            raise DeeplightError("evaluate: a registered model brings its own feature map; drop --feature-map")
    else:
        ckpt = ev.resolve_checkpoint(a.model)
        feature_map = a.feature_map or (str(Path(a.data) / "feature_map.json") if a.data else None)
        from deeplight.ops.registry import checkpoint_label

        label = checkpoint_label(ckpt)
    if a.input:
        if feature_map is None:
            raise DeeplightError("evaluate --input: a checkpoint does not hold its feature map; give --data (the "
                                 "hashed dataset it was trained on) or --feature-map FILE")
        _check_feature_map(feature_map, a.model if registered else ckpt, registered)

    def score(data_dir: str) -> dict:
        if registered:
            return ev.evaluate_compact(model_dir / "compact.npz", data_dir, split=split, plots_dir=plots,
                                       latency_rounds=a.latency_rounds, model=a.model, feature_map=feature_map)
        return ev.evaluate_model(str(ckpt), data_dir, split=split, plots_dir=plots, dense=a.dense,
                                 latency_rounds=a.latency_rounds)

    max_bad = config_from(a).data.max_bad_fraction
    with tempfile.TemporaryDirectory(prefix="deeplight-evaluate-") as tmp:
        def run() -> dict:
            if not a.input:
                return score(a.data)
            hashed, report = ev.raw_to_hashed(a.input, feature_map, tmp, max_bad_fraction=max_bad)
            quarantine = None
            if report["quarantined"]:  # kept beside the metrics JSON, as ingest keeps it beside its splits
                quarantine = str(Path(a.out).with_suffix("")) + "_quarantine.jsonl"
                Path(quarantine).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(tmp) / "ingested" / "quarantine.jsonl", quarantine)
                print(f"evaluate: {report['quarantined']} of {report['read']} rows are bad, left out: {quarantine}",
                      file=sys.stderr)
            metrics = score(hashed)
            metrics.pop("data_fingerprint", None)  # that of the temporary copy's empty train/valid splits
            return {**metrics, "input": ev.input_summary(a.input, report, quarantine)}

        if a.no_mlflow:
            metrics = run()
        else:
            from deeplight.ops.registry import evaluate_tracked
            from deeplight.ops.tracking import run_label

            name = run_label("evaluate", label, "input" if a.input else split)
            metrics = evaluate_tracked(run, plots, _tracker(a), name=name)
    if a.input:  # the hashed copy was temporary: the files it came from name the data
        metrics["data_dir"] = ",".join(map(str, a.input))
    from deeplight.base.files import write_json

    write_json(a.out, metrics)
    _print_json({k: v for k, v in metrics.items() if k not in ("kept_pairs", "calibration_curve")}
                | ({"kept_pairs": len(metrics["kept_pairs"])} if "kept_pairs" in metrics else {}))


def _is_model_dir(path: str) -> bool:
    from pathlib import Path

    p = Path(path)
    return p.is_dir() and not (p / "best.pt").is_file() and any(
        (d / "compact.npz").is_file() for d in (p, p / "artifacts"))


def _check_feature_map(feature_map: str, model: object, registered: bool) -> None:
    """Before reading any raw row: the feature map exists and (for a checkpoint) is the one it was trained with."""
    from pathlib import Path

    if not Path(feature_map).is_file():
        raise DeeplightError(f"{feature_map}: no such feature map (written by `deeplight hash` into its --out)")
    if registered:
        return
    from deeplight.data.feature_map import FeatureMap
    from deeplight.model import checkpoint as ckpt_io

    want = ckpt_io.load(model).get("feature_map_fingerprint", "")
    if FeatureMap.load(feature_map).fingerprint() != want:
        raise DeeplightError(f"{model} was trained with another feature map than {feature_map}; give the hashed "
                             "dataset it was trained on")


def cmd_register(a: argparse.Namespace) -> None:
    from deeplight.base.files import read_json
    from deeplight.ops.registry import register_model

    tags = {}
    for item in a.tag or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DeeplightError(f"--tag wants KEY=VALUE, got {item!r}")
        tags[key] = value
    metrics = read_json(a.metrics) if a.metrics else None
    name = config_from(a).registry.model_name
    result = register_model(a.model, a.data, name, metrics=metrics, parent_run_id=a.parent_run_id, tags=tags,
                            metrics_file=a.metrics)
    _print_json(result)


EXIT_REJECTED = 3  # `deeplight promote`: the gate rejected the challenger (2 is an error, 0 promoted or unchanged)


def cmd_promote(a: argparse.Namespace) -> int:
    from deeplight.ops.registry import promote

    cfg = config_from(a)
    decision = promote(cfg.registry.model_name, tolerance=cfg.promote.tolerance,
                       latency_slo_us=cfg.promote.latency_slo_us)
    _print_json(decision)
    return EXIT_REJECTED if decision["decision"] == "rejected" else 0


def cmd_serve(a: argparse.Namespace) -> None:
    from deeplight.ops.server import serve

    s = config_from(a).serve
    model = a.model or f"models:/{config_from(a).registry.model_name}@champion"
    print(f"deeplight serve: {model} on http://{s.host}:{s.port} (v2: /v2/models/{a.name}/infer, "
          f"v1: /v1/models/{a.name}:predict)", flush=True)
    serve(model, name=a.name, host=s.host, port=s.port, threads=s.threads, access_log=s.access_log)

def _tracker(a: argparse.Namespace, data_dir: str | None = None, system_metrics: bool = False):
    """The command's MLflow tracker (None with --no-mlflow); `data_dir`: the hashed dataset logged as the runs'
    inputs; `system_metrics`: MLflow's CPU/memory/disk samples on training runs."""
    from deeplight.model.distributed import env_rank

    if a.no_mlflow or env_rank() != 0:  # under torchrun only rank 0 talks to MLflow
        return None
    from deeplight.ops.tracking import MlflowTracker

    return MlflowTracker(data_dir=data_dir, system_metrics=system_metrics)


def _run_name(step: str, data_dir: str, *parts: str) -> str:
    """`train-criteo-deepfwfm-20261206-2253`: the step, the hashed dataset's name, what is trained, the date."""
    from deeplight.data.loader import read_manifest
    from deeplight.ops.tracking import run_label

    return run_label(step, read_manifest(data_dir).get("dataset", ""), *parts)


# --- parser ---------------------------------------------------------------------------------------------

MLFLOW_HELP = ("MLflow: runs and models go to MLFLOW_TRACKING_URI (default: sqlite under ./mlruns). For a server "
               "that needs a login, set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
               "MLFLOW_TRACKING_TOKEN) instead of putting user:password@ in the URI; such a URI still works, but "
               "deeplight moves the credentials out of it, and never prints them.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deeplight", description=__doc__.splitlines()[0], epilog=MLFLOW_HELP)
    p.add_argument("--version", action="version", version=f"deeplight {deeplight.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[[argparse.Namespace], None], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        sp.set_defaults(handler=handler)
        return sp

    sp = add("synth", cmd_synth, "write a synthetic raw Criteo/Avazu file with known click model (+ truth JSON)")
    sp.add_argument("--dataset", default="criteo", help="schema name: criteo | avazu")
    sp.add_argument("--rows", type=int, required=True)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", required=True, help="raw file to write (.gz compresses); truth at OUT.truth.json")
    sp.add_argument("--truth", help="truth JSON path (default OUT.truth.json)")

    sp = add("ingest", cmd_ingest, "raw TSV/CSV (plain, .gz, s3://) to typed Parquet splits, bad rows quarantined")
    setting(sp, "--dataset", "data.dataset", help="schema name: criteo | avazu")
    sp.add_argument("--input", nargs="+", required=True, help="raw files: local paths or s3:// URIs")
    sp.add_argument("--out", required=True, help="output directory (replaced atomically)")
    setting(sp, "--split", "data.split", _split, "train,valid,test fractions")
    setting(sp, "--split-mode", "data.split_mode", choices=["random", "sequential"])
    setting(sp, "--seed", "data.seed", int, "seed of the random split")
    setting(sp, "--max-bad-fraction", "data.max_bad_fraction", float,
            "fail when more than this share of an input's rows is bad")
    add_set(sp)

    sp = add("hash", cmd_hash, "fit a feature map on the train split and write int32 feature ids per split")
    sp.add_argument("--input", required=True, help="an ingested dataset directory")
    sp.add_argument("--out", required=True)
    g = sp.add_mutually_exclusive_group()
    setting(g, "--buckets", "features.buckets", int, "stable hashing into N buckets per field")
    setting(g, "--min-count", "features.min_count", int, "vocabulary of values seen >= K times in train")
    add_set(sp)

    sp = add("apply-features", cmd_apply_features, "apply a fitted feature map to another ingested dataset")
    sp.add_argument("--feature-map", required=True, help="feature_map.json written by `deeplight hash`")
    sp.add_argument("--input", required=True, help="an ingested dataset directory")
    sp.add_argument("--out", required=True)

    sp = add("train", cmd_train, "train a dense DeepFwFM (or FwFM/FM/LR baseline) on hashed Parquet")
    sp.add_argument("--data", required=True, help="a hashed dataset directory")
    sp.add_argument("--out", required=True, help="checkpoints and results; an existing run here is resumed")
    setting(sp, "--model", "model.kind", choices=["deepfwfm", "fwfm", "fm", "lr"], help="model kind")
    setting(sp, "--epochs", "train.epochs", int, "most epochs (early stopping on valid AUC)")
    setting(sp, "--seed", "train.seed", int)
    setting(sp, "--batch-size", "train.batch_size", int)
    setting(sp, "--lr", "train.lr", float, "Adam learning rate")
    setting(sp, "--patience", "train.patience", int, "epochs without a better valid AUC before stopping")
    setting(sp, "--threads", "train.threads", int, "torch threads (0: torch's choice)")
    setting(sp, "--checkpoint-every", "train.checkpoint_every", int, "batches between resume checkpoints")
    _device(sp)
    add_set(sp)
    sp.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")

    sp = add("prune", cmd_prune, "prune a trained dense model to target sparsities (DeepLight), then fine-tune; "
                                   "settings not given are the dense checkpoint's")
    sp.add_argument("--dense", required=True, help="dense checkpoint (best.pt written by `deeplight train`)")
    sp.add_argument("--data", required=True, help="the hashed dataset the dense model was trained on")
    sp.add_argument("--out", required=True, help="checkpoints and results; an existing run here is resumed")
    setting(sp, "--dnn", "prune.dnn", float, "DNN sparsity target")
    setting(sp, "--field", "prune.field", float, "field-pair (R) sparsity target")
    setting(sp, "--embedding", "prune.embedding", float, "embedding sparsity target")
    setting(sp, "--mode", "prune.mode", choices=["unstructured", "structured"], help="pruning mode")
    setting(sp, "--ramp-epochs", "prune.ramp_epochs", float, "epochs over which sparsity ramps up")
    setting(sp, "--finetune-epochs", "prune.finetune_epochs", int, "epochs at full sparsity after the ramp")
    setting(sp, "--distill-weight", "prune.distill_weight", float,
            "weight of the loss toward the dense model's probabilities (0: no distillation)")
    setting(sp, "--max-auc-loss", "prune.max_auc_loss", float,
            "choose the fastest structured setting whose valid AUC is at most this below dense (prune.auto, the "
            "default when no target or mode is given; targets or mode given: pruned to them)")
    setting(sp, "--max-logloss-gain", "prune.max_logloss_gain", float,
            "with --max-auc-loss: largest valid logloss increase over dense")
    setting(sp, "--seed", "train.seed", int)
    setting(sp, "--batch-size", "train.batch_size", int)
    setting(sp, "--threads", "train.threads", int, "torch threads (0: torch's choice)")
    _device(sp)
    add_set(sp)
    sp.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")

    sp = add("compact", cmd_compact, "convert a (pruned) checkpoint to the compact inference engine + ONNX/TorchScript")
    sp.add_argument("--checkpoint", required=True, help="best.pt written by `deeplight train` or `deeplight prune`")
    sp.add_argument("--out", required=True, help="directory for compact.npz, model.onnx, model.torchscript.pt")
    sp.add_argument("--no-exports", action="store_true", help="write compact.npz only")

    sp = add("pipeline", cmd_pipeline, "the KFP pipeline: compile to IR YAML, run locally (make run), submit")
    from deeplight.cli.pipeline import add_commands  # argparse only; kfp is imported when a command runs

    add_commands(sp)

    sp = add("sweep", cmd_sweep, "Optuna sparsity sweep: valid AUC vs batch-1 latency Pareto front, resumable, "
                                 "distributed over workers sharing --storage")
    sp.add_argument("--data", required=True, help="a hashed dataset directory")
    sp.add_argument("--out", required=True, help="dense model (unless --dense), trial checkpoints, report")
    sp.add_argument("--dense", help="prune from this dense checkpoint instead of training one into OUT/dense")
    setting(sp, "--study", "sweep.study", help="Optuna study name; the same name resumes it")
    sp.add_argument("--storage", help="Optuna RDB URL shared by workers (default sqlite:///mlruns/optuna.db)")
    setting(sp, "--n-trials", "sweep.n_trials", int, "COMPLETE trials the study ends with (all workers)")
    setting(sp, "--sampler", "sweep.sampler", help="tpe | nsga2 | random")
    setting(sp, "--seed", "sweep.seed", int, "sampler seed")
    setting(sp, "--tolerance", "sweep.tolerance", float,
            "choose the fastest trial whose valid AUC is within this of the dense model's")
    setting(sp, "--dnn", "sweep.dnn", _range(float), "DNN sparsity range LOW:HIGH (or one value)", sep=":")
    setting(sp, "--field", "sweep.field", _range(float), "field-pair (R) sparsity range", sep=":")
    setting(sp, "--embedding", "sweep.embedding", _range(float), "embedding sparsity range", sep=":")
    setting(sp, "--modes", "sweep.modes", _names, "pruning modes to try")
    setting(sp, "--finetune-epochs", "sweep.finetune_epochs", _range(int), "fine-tune epochs range", sep=":")
    setting(sp, "--latency-calls", "sweep.latency_calls", int, "batch-1 calls timed per trial (median)")
    setting(sp, "--heartbeat", "sweep.heartbeat", int, "seconds between a running trial's heartbeats")
    _device(sp, "the dense model and the trials")
    sp.add_argument("--grace", type=int, help="a trial without heartbeat this long is failed (default 3x heartbeat)")
    setting(sp, "--experiment", "registry.experiment", help="MLflow experiment")
    sp.add_argument("--no-finalize", action="store_true", help="run trials only (a pipeline worker)")
    sp.add_argument("--register", action="store_true", help="register the chosen model in the MLflow registry")
    setting(sp, "--model-name", "registry.model_name", help="registered model name for --register")
    add_set(sp)

    sp = add("report", cmd_report, "a sweep as a Markdown report with plots (Pareto front, RQ1-RQ4, field pairs)")
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--study", help="Optuna study name (read from --storage)")
    g.add_argument("--summary", help="summary.json written by `deeplight sweep` (OUT/report/summary.json)")
    sp.add_argument("--storage", help="Optuna RDB URL (default sqlite:///mlruns/optuna.db)")
    sp.add_argument("--out", required=True, help="directory for report.md and its plots")

    sp = add("evaluate", cmd_evaluate, "metrics JSON of a dense or pruned model on a split, or on raw files through "
                                       "the model's own feature map: AUC, logloss, calibration, latency, size, "
                                       "sparsity, kept pairs (+ plots, MLflow)")
    sp.add_argument("--model", required=True, help="checkpoint (best.pt), a train/prune output directory, or a "
                                                   "registered model: models:/NAME@ALIAS, models:/NAME/VERSION")
    sp.add_argument("--data", help="the hashed dataset the model was trained on (scored: its --split; with --input: "
                                   "where the checkpoint's feature map is)")
    sp.add_argument("--input", nargs="+", help="raw Criteo/Avazu files (local, .gz, s3://), e.g. another day's rows: "
                                               "ingested and mapped by the model's feature map, all rows scored; bad "
                                               "rows are counted and left out (OUT without .json + _quarantine.jsonl)")
    sp.add_argument("--feature-map", help="with --input and a checkpoint: its feature_map.json (instead of --data)")
    sp.add_argument("--split", default="test", choices=["train", "valid", "test"], help="split of --data scored")
    sp.add_argument("--out", required=True, help="metrics JSON to write")
    sp.add_argument("--plots", help="directory for the plots (default: OUT without .json + _plots)")
    sp.add_argument("--dense", help="the dense checkpoint a pruned model came from (drawn in the R heatmap)")
    sp.add_argument("--latency-rounds", type=int, default=5, help="timing rounds per batch size (median)")
    setting(sp, "--max-bad-fraction", "data.max_bad_fraction", float,
            "with --input: fail when more than this share of a file's rows is bad")
    add_set(sp)
    sp.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")

    sp = add("register", cmd_register, "log a model that scores raw rows to the MLflow registry (alias challenger)")
    sp.add_argument("--model", required=True, help="checkpoint (best.pt) or a train/prune output directory")
    sp.add_argument("--data", required=True, help="the hashed dataset it was trained on (feature map, test split)")
    setting(sp, "--name", "registry.model_name", help="registered model name")
    sp.add_argument("--metrics", help="metrics JSON from `deeplight evaluate` of this model on the test split, "
                                      "checked by the checkpoint's sha256 (else evaluated now)")
    sp.add_argument("--parent-run-id", help="MLflow run of the pipeline this registration belongs to")
    sp.add_argument("--tag", action="append", metavar="KEY=VALUE", help="extra version tag (repeatable)")
    add_set(sp)

    sp = add("promote", cmd_promote, "move alias champion to the challenger if it passes the AUC/latency gate; "
                                     "exit status 0: promoted or unchanged, 3: rejected by the gate, 2: error")
    setting(sp, "--name", "registry.model_name", help="registered model name")
    setting(sp, "--tolerance", "promote.tolerance", float, "largest test AUC drop vs the champion that still passes")
    setting(sp, "--latency-slo-us", "promote.latency_slo_us", float,
            "largest served latency of one raw row (microseconds, measured at registration) that passes")
    add_set(sp)

    sp = add("serve", cmd_serve, "serve a registered model over HTTP: a KServe predictor (Open Inference Protocol "
                                 "v2 and v1) scoring raw rows")
    sp.add_argument("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION or a model directory "
                                    "(default: models:/<registry.model_name>@champion)")
    sp.add_argument("--name", default="deeplight", help="the model's name in the URLs")
    setting(sp, "--host", "serve.host", help="address to bind (0.0.0.0 in a cluster pod)")
    setting(sp, "--port", "serve.port", int)
    setting(sp, "--threads", "serve.threads", int, "BLAS threads of the engine")
    sp.add_argument("--access-log", dest="serve.access_log", action="store_const", const=True,
                    default=argparse.SUPPRESS, help="log every request (default: off; Config serve.access_log)")
    add_set(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except DeeplightError as e:
        print(f"deeplight: error: {redact(e)}", file=sys.stderr)  # an error may quote a URI with credentials
        return 2


if __name__ == "__main__":
    sys.exit(main())
