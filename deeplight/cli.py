"""`deeplight` command line: one subcommand per pipeline step, each with --help.

Heavy modules (torch, mlflow, kfp) are imported inside the handlers so that `--help` stays fast.
A `DeeplightError` prints as `deeplight: error: ...` with exit status 2, never as a stack trace.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from deeplight.errors import DeeplightError


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
    from deeplight.synth import synthesize

    _print_json(synthesize(a.dataset, rows=a.rows, seed=a.seed, out=a.out, truth_path=a.truth))


def cmd_ingest(a: argparse.Namespace) -> None:
    from deeplight.ingest import ingest

    report = ingest(a.dataset, a.input, a.out, split=a.split, split_mode=a.split_mode, seed=a.seed,
                    max_bad_fraction=a.max_bad_fraction)
    _print_json(report)


def cmd_hash(a: argparse.Namespace) -> None:
    from deeplight.features import hash_dataset

    min_count = None if a.buckets is not None else a.min_count
    _print_json(hash_dataset(a.input, a.out, buckets=a.buckets, min_count=min_count))


def cmd_apply_features(a: argparse.Namespace) -> None:
    from deeplight.features import FeatureMap, apply_feature_map

    _print_json(apply_feature_map(FeatureMap.load(a.feature_map), a.input, a.out))


def cmd_train(a: argparse.Namespace) -> None:
    from deeplight.config import Config
    from deeplight.train import train

    cfg = Config().replace(**{
        "model.kind": a.model, "train.epochs": a.epochs, "train.seed": a.seed, "train.batch_size": a.batch_size,
        "train.lr": a.lr, "train.patience": a.patience, "train.threads": a.threads,
        "train.checkpoint_every": a.checkpoint_every,
    })
    result = train(a.data, a.out, cfg, tracker=_tracker(a))
    _print_json({k: v for k, v in result.items() if k != "history"})


def cmd_prune(a: argparse.Namespace) -> None:
    from deeplight.prune import config_of, prune

    cfg = config_of(a.dense).replace(**{
        "prune.dnn": a.dnn, "prune.field": a.field, "prune.embedding": a.embedding, "prune.mode": a.mode,
        "prune.ramp_epochs": a.ramp_epochs, "prune.finetune_epochs": a.finetune_epochs, "train.seed": a.seed,
        "train.batch_size": a.batch_size, "train.threads": a.threads,
    })
    result = prune(a.dense, a.data, a.out, cfg, tracker=_tracker(a))
    _print_json({k: v for k, v in result.items() if k != "history"})


def cmd_run_local(a: argparse.Namespace) -> None:
    from deeplight.local_run import run_local

    run_local(rows=a.rows, seed=a.seed, epochs=a.epochs, track=not a.no_mlflow)


def _tracker(a: argparse.Namespace):
    if a.no_mlflow:
        return None
    from deeplight.tracking import MlflowTracker

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
    sp.add_argument("--dnn", type=float, help="DNN sparsity target (default 0.9)")
    sp.add_argument("--field", type=float, help="field-pair (R) sparsity target (default 0.9)")
    sp.add_argument("--embedding", type=float, help="embedding sparsity target (default 0.4)")
    sp.add_argument("--mode", choices=["unstructured", "structured"])
    sp.add_argument("--ramp-epochs", type=float, help="epochs over which sparsity ramps up (default 2)")
    sp.add_argument("--finetune-epochs", type=int, help="epochs at full sparsity after the ramp (default 2)")
    sp.add_argument("--seed", type=int)
    sp.add_argument("--batch-size", type=int)
    sp.add_argument("--threads", type=int)
    sp.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")

    sp = add("run-local", cmd_run_local, "the whole job on synthetic Criteo data, tracked in ./mlruns (make run)")
    sp.add_argument("--rows", type=int, default=300_000)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--epochs", type=int, default=4, help="dense training epochs")
    sp.add_argument("--no-mlflow", action="store_true")
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
