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

from deeplight.base.config import PruneConfig
from deeplight.base.errors import DeeplightError

_PRUNE = PruneConfig()  # defaults shown in --help, read from the one config object


def _split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--split wants three numbers like 0.8,0.1,0.1, got {text!r}") from None
    if len(parts) != 3 or any(p < 0 for p in parts) or abs(sum(parts) - 1.0) > 1e-6:
        raise argparse.ArgumentTypeError(f"--split wants three non-negative fractions summing to 1, got {text!r}")
    return parts  # type: ignore[return-value]


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
    report = ingest(a.dataset, a.input, a.out, split=a.split, split_mode=a.split_mode, seed=a.seed,
                    max_bad_fraction=a.max_bad_fraction)
    _print_json(report)


def cmd_hash(a: argparse.Namespace) -> None:
    from deeplight.data.hashing import hash_dataset
    from deeplight.base.allocators import tune_allocators

    _freeze_startup_objects()
    tune_allocators()
    min_count = None if a.buckets is not None else a.min_count
    _print_json(hash_dataset(a.input, a.out, buckets=a.buckets, min_count=min_count))


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

    cfg = Config().replace(**{
        "model.kind": a.model, "train.epochs": a.epochs, "train.seed": a.seed, "train.batch_size": a.batch_size,
        "train.lr": a.lr, "train.patience": a.patience, "train.threads": a.threads,
        "train.checkpoint_every": a.checkpoint_every,
    })
    result = train(a.data, a.out, cfg, tracker=_tracker(a))
    _print_json({k: v for k, v in result.items() if k != "history"})


def cmd_prune(a: argparse.Namespace) -> None:
    from deeplight.model.prune import config_of, prune

    cfg = config_of(a.dense).replace(**{
        "prune.dnn": a.dnn, "prune.field": a.field, "prune.embedding": a.embedding, "prune.mode": a.mode,
        "prune.ramp_epochs": a.ramp_epochs, "prune.finetune_epochs": a.finetune_epochs, "train.seed": a.seed,
        "train.batch_size": a.batch_size, "train.threads": a.threads,
    })
    result = prune(a.dense, a.data, a.out, cfg, tracker=_tracker(a))
    _print_json({k: v for k, v in result.items() if k != "history"})


def cmd_compact(a: argparse.Namespace) -> None:
    from deeplight.serve.export import compact_checkpoint

    _print_json(compact_checkpoint(a.checkpoint, a.out, exports=not a.no_exports))


def cmd_pipeline(a: argparse.Namespace) -> None:
    from deeplight.cli.pipeline import main

    main(a)


def cmd_sweep(a: argparse.Namespace) -> None:
    from deeplight.base.config import parse_sets
    from deeplight.ops.sweep import SearchSpace, SweepSettings, brief, parse_range, run_sweep

    space = SearchSpace(dnn=parse_range(a.dnn), field=parse_range(a.field), embedding=parse_range(a.embedding),
                        modes=tuple(m.strip() for m in a.modes.split(",") if m.strip()),
                        finetune_epochs=parse_range(a.finetune_epochs, int))
    settings = SweepSettings(study=a.study, storage=a.storage, n_trials=a.n_trials, sampler=a.sampler, seed=a.seed,
                             tolerance=a.tolerance, space=space, latency_calls=a.latency_calls,
                             heartbeat_interval=a.heartbeat, grace_period=a.grace, experiment=a.experiment)
    summary = run_sweep(a.data, a.out, settings, overrides=parse_sets(a.set), dense=a.dense,
                        finalize=not a.no_finalize, register=a.model_name if a.register else None)
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
    from pathlib import Path

    from deeplight.evaluation.evaluate import evaluate_model

    plots = a.plots or str(Path(a.out).with_suffix("")) + "_plots"
    metrics = evaluate_model(a.model, a.data, split=a.split, out_json=a.out, plots_dir=plots, dense=a.dense,
                             latency_rounds=a.latency_rounds)
    if not a.no_mlflow:
        from deeplight.ops.registry import log_evaluation

        log_evaluation(metrics, plots, _tracker(a))
    _print_json({k: v for k, v in metrics.items() if k != "kept_pairs"} | {"kept_pairs": len(metrics["kept_pairs"])})


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
    result = register_model(a.model, a.data, a.name, metrics=metrics, parent_run_id=a.parent_run_id, tags=tags)
    _print_json(result)


def cmd_promote(a: argparse.Namespace) -> None:
    from deeplight.ops.registry import promote

    _print_json(promote(a.name, tolerance=a.tolerance, latency_slo_us=a.latency_slo_us))

def _tracker(a: argparse.Namespace):
    if a.no_mlflow:
        return None
    from deeplight.ops.tracking import MlflowTracker

    return MlflowTracker()


# --- parser ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deeplight", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[[argparse.Namespace], None], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(handler=handler)
        return sp

    sp = add("synth", cmd_synth, "write a synthetic raw Criteo/Avazu file with known click model (+ truth JSON)")
    sp.add_argument("--dataset", default="criteo", help="schema name: criteo | avazu")
    sp.add_argument("--rows", type=int, required=True)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", required=True, help="raw file to write (.gz compresses); truth at OUT.truth.json")
    sp.add_argument("--truth", help="truth JSON path (default OUT.truth.json)")

    sp = add("ingest", cmd_ingest, "raw TSV/CSV (plain, .gz, s3://) to typed Parquet splits, bad rows quarantined")
    sp.add_argument("--dataset", default="criteo", help="schema name: criteo | avazu")
    sp.add_argument("--input", nargs="+", required=True, help="raw files: local paths or s3:// URIs")
    sp.add_argument("--out", required=True, help="output directory (replaced atomically)")
    sp.add_argument("--split", type=_split, default=(0.8, 0.1, 0.1), help="train,valid,test fractions")
    sp.add_argument("--split-mode", choices=["random", "sequential"], default="random")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--max-bad-fraction", type=float, default=0.5,
                    help="fail when more than this share of an input's rows is bad")

    sp = add("hash", cmd_hash, "fit a feature map on the train split and write int32 feature ids per split")
    sp.add_argument("--input", required=True, help="an ingested dataset directory")
    sp.add_argument("--out", required=True)
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--buckets", type=int, help="stable hashing into N buckets per field")
    g.add_argument("--min-count", type=int, default=8, help="vocabulary of values seen >= K times in train")

    sp = add("apply-features", cmd_apply_features, "apply a fitted feature map to another ingested dataset")
    sp.add_argument("--feature-map", required=True, help="feature_map.json written by `deeplight hash`")
    sp.add_argument("--input", required=True, help="an ingested dataset directory")
    sp.add_argument("--out", required=True)

    sp = add("train", cmd_train, "train a dense DeepFwFM (or FwFM/FM/LR baseline) on hashed Parquet")
    sp.add_argument("--data", required=True, help="a hashed dataset directory")
    sp.add_argument("--out", required=True, help="checkpoints and results; an existing run here is resumed")
    sp.add_argument("--model", choices=["deepfwfm", "fwfm", "fm", "lr"])
    sp.add_argument("--epochs", type=int)
    sp.add_argument("--seed", type=int)
    sp.add_argument("--batch-size", type=int)
    sp.add_argument("--lr", type=float)
    sp.add_argument("--patience", type=int)
    sp.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    sp.add_argument("--checkpoint-every", type=int, help="batches between resume checkpoints (default 500)")
    sp.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")

    sp = add("prune", cmd_prune, "prune a trained dense model to target sparsities (DeepLight), then fine-tune")
    sp.add_argument("--dense", required=True, help="dense checkpoint (best.pt written by `deeplight train`)")
    sp.add_argument("--data", required=True, help="the hashed dataset the dense model was trained on")
    sp.add_argument("--out", required=True, help="checkpoints and results; an existing run here is resumed")
    sp.add_argument("--dnn", type=float, help=f"DNN sparsity target (default {_PRUNE.dnn:g})")
    sp.add_argument("--field", type=float, help=f"field-pair (R) sparsity target (default {_PRUNE.field:g})")
    sp.add_argument("--embedding", type=float, help=f"embedding sparsity target (default {_PRUNE.embedding:g})")
    sp.add_argument("--mode", choices=["unstructured", "structured"])
    sp.add_argument("--ramp-epochs", type=float,
                    help=f"epochs over which sparsity ramps up (default {_PRUNE.ramp_epochs:g})")
    sp.add_argument("--finetune-epochs", type=int,
                    help=f"epochs at full sparsity after the ramp (default {_PRUNE.finetune_epochs})")
    sp.add_argument("--seed", type=int)
    sp.add_argument("--batch-size", type=int)
    sp.add_argument("--threads", type=int)
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
    sp.add_argument("--study", default="deeplight-sweep", help="Optuna study name; the same name resumes it")
    sp.add_argument("--storage", help="Optuna RDB URL shared by workers (default sqlite:///mlruns/optuna.db)")
    sp.add_argument("--n-trials", type=int, default=20, help="COMPLETE trials the study ends with (all workers)")
    sp.add_argument("--sampler", default="tpe", help="tpe | nsga2 | random")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--tolerance", type=float, default=0.001,
                    help="choose the fastest trial whose valid AUC is within this of the dense model's")
    sp.add_argument("--dnn", default="0.0:0.98", help="DNN sparsity range LOW:HIGH (or one value)")
    sp.add_argument("--field", default="0.0:0.98", help="field-pair (R) sparsity range")
    sp.add_argument("--embedding", default="0.0:0.9", help="embedding sparsity range")
    sp.add_argument("--modes", default="unstructured,structured", help="pruning modes to try")
    sp.add_argument("--finetune-epochs", default="1:2", help="fine-tune epochs range")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="config setting for the dense model and pruning, e.g. model.dnn=[16] train.epochs=1 "
                         "prune.ramp_epochs=1 (repeatable)")
    sp.add_argument("--latency-calls", type=int, default=2000, help="batch-1 calls timed per trial (median)")
    sp.add_argument("--heartbeat", type=int, default=10, help="seconds between a running trial's heartbeats")
    sp.add_argument("--grace", type=int, help="a trial without heartbeat this long is failed (default 3x heartbeat)")
    sp.add_argument("--experiment", default="deeplight", help="MLflow experiment")
    sp.add_argument("--no-finalize", action="store_true", help="run trials only (a pipeline worker)")
    sp.add_argument("--register", action="store_true", help="register the chosen model in the MLflow registry")
    sp.add_argument("--model-name", default="deeplight", help="registered model name for --register")

    sp = add("report", cmd_report, "a sweep as a Markdown report with plots (Pareto front, RQ1-RQ4, field pairs)")
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--study", help="Optuna study name (read from --storage)")
    g.add_argument("--summary", help="summary.json written by `deeplight sweep` (OUT/report/summary.json)")
    sp.add_argument("--storage", help="Optuna RDB URL (default sqlite:///mlruns/optuna.db)")
    sp.add_argument("--out", required=True, help="directory for report.md and its plots")

    sp = add("evaluate", cmd_evaluate, "metrics JSON of a dense or pruned model on a split: AUC, logloss, "
                                       "calibration, latency, size, sparsity, kept pairs (+ plots, MLflow)")
    sp.add_argument("--model", required=True, help="checkpoint (best.pt) or a train/prune output directory")
    sp.add_argument("--data", required=True, help="the hashed dataset the model was trained on")
    sp.add_argument("--split", default="test", choices=["train", "valid", "test"])
    sp.add_argument("--out", required=True, help="metrics JSON to write")
    sp.add_argument("--plots", help="directory for the plots (default: OUT without .json + _plots)")
    sp.add_argument("--dense", help="the dense checkpoint a pruned model came from (drawn in the R heatmap)")
    sp.add_argument("--latency-rounds", type=int, default=5, help="timing rounds per batch size (median)")
    sp.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")

    sp = add("register", cmd_register, "log a model that scores raw rows to the MLflow registry (alias challenger)")
    sp.add_argument("--model", required=True, help="checkpoint (best.pt) or a train/prune output directory")
    sp.add_argument("--data", required=True, help="the hashed dataset it was trained on (feature map, test split)")
    sp.add_argument("--name", required=True, help="registered model name")
    sp.add_argument("--metrics", help="metrics JSON from `deeplight evaluate` on the test split (else evaluated now)")
    sp.add_argument("--parent-run-id", help="MLflow run of the pipeline this registration belongs to")
    sp.add_argument("--tag", action="append", metavar="KEY=VALUE", help="extra version tag (repeatable)")

    sp = add("promote", cmd_promote, "move alias champion to the challenger if it passes the AUC/latency gate")
    sp.add_argument("--name", required=True, help="registered model name")
    sp.add_argument("--tolerance", type=float, default=0.001,
                    help="largest test AUC drop vs the champion that still passes")
    sp.add_argument("--latency-slo-us", type=float, help="largest batch-1 latency (microseconds) that passes")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except DeeplightError as e:
        print(f"deeplight: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
