"""Accuracy side by side: LR, FM, FwFM, DeepFwFM and pruned DeepFwFM on one split, plus the oracle AUC.

    # synthetic Criteo with known truth (oracle AUC from the generator's click model)
    .venv/bin/python bench/accuracy.py --synthetic-rows 1000000
    # the real Criteo sample (80/10/10 random split; no oracle)
    .venv/bin/python bench/accuracy.py --raw ../shared/data/criteo/train_10k.txt --dataset criteo

Prints a Markdown table and writes it with the JSON results to --out. Training samples/s and the share of
wall time spent waiting for data (a loader-only pass timed against the training epoch) are reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from deeplight.base.config import Config, parse_sets
from deeplight.data.loader import SplitLoader
from deeplight.data.hashing import hash_dataset
from deeplight.data.ingest import ingest
from deeplight.model.prune import prune
from deeplight.data.schema import get_schema
from deeplight.data.synth import load_truth, oracle_auc, synthesize, true_probability
from deeplight.model.train import train

HERE = Path(__file__).resolve().parent


def oracle(dataset: str, ingested: Path, truth_path: Path) -> float:
    """AUC of the generator's true click probabilities on the test split: the best any model can do."""
    table = pq.read_table(ingested / "test")
    labels = table.column(get_schema(dataset).label.name).to_numpy().astype(np.float64)
    return oracle_auc(labels, true_probability(table, load_truth(truth_path)))


def loader_share(hashed: Path, batch_size: int, train_seconds_per_epoch: float) -> float:
    """Seconds to stream one epoch of batches (shuffled) over the seconds one training epoch took."""
    loader = SplitLoader(hashed, "train", batch_size=batch_size, shuffle=True, seed=0)
    start = time.perf_counter()
    for _ in loader.epoch(0):
        pass
    return (time.perf_counter() - start) / train_seconds_per_epoch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic-rows", type=int, default=0)
    ap.add_argument("--raw", help="a raw file instead of synthetic data")
    ap.add_argument("--dataset", default="criteo")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--work", default=str(HERE / "out" / "accuracy-work"))
    ap.add_argument("--out", default=str(HERE / "out" / "accuracy"))
    ap.add_argument("--models", default="lr,fm,fwfm,deepfwfm")
    # structured: 90% / 95% of neurons, R down to 10 of 741 pairs (twice the generator's 5 planted pairs), 60% of
    # embedding rows
    ap.add_argument("--prune", nargs="*", default=["unstructured:0.9,0.9,0.4", "structured:0.9,0.9865,0.6",
                                                   "structured:0.95,0.9865,0.6"],
                    help="MODE:dnn,field,embedding settings, one pruned row each (none: skip)")
    ap.add_argument("--prune-lr", type=float, default=None, help="learning rate while pruning (default: prune.lr)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a dotted config override, e.g. train.weight_decay=1e-5 (repeatable; values as JSON)")
    ap.add_argument("--min-count", type=int, default=8)
    a = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.raw:
        raw, truth_path, tag = Path(a.raw), None, Path(a.raw).name
    else:
        raw = work / f"synth-{a.dataset}-{a.synthetic_rows}.txt"
        truth_path = Path(str(raw) + ".truth.json")
        if not raw.exists():
            synthesize(a.dataset, rows=a.synthetic_rows, seed=0, out=str(raw))
        tag = f"synthetic {a.dataset} {a.synthetic_rows:,} rows"
    ingested, hashed = work / f"{raw.name}.ingested", work / f"{raw.name}.hashed"
    if not (ingested / "report.json").exists():
        ingest(a.dataset, [str(raw)], str(ingested), seed=0)
    if not (hashed / "manifest.json").exists():
        hash_dataset(str(ingested), str(hashed), min_count=a.min_count)
    cfg = Config().replace(**{"train.epochs": a.epochs, **parse_sets(a.set)})
    rows, results = [], {}
    for kind in a.models.split(","):
        r = train(hashed, work / f"{raw.name}.{kind}", cfg.replace(**{"model.kind": kind}))
        results[kind] = r
        best = r["history"][r["best_epoch"]]
        rows.append((kind, r, best["samples_per_s"], r["params"]["total"]))
    for setting in a.prune if "deepfwfm" in results else []:
        mode, _, targets = setting.partition(":")
        dnn, field, emb = (float(x) for x in targets.split(","))
        pcfg = cfg.replace(**{"prune.dnn": dnn, "prune.field": field, "prune.embedding": emb,
                              "prune.mode": mode, "prune.lr": a.prune_lr})
        run = f"pruned-{mode}-{targets.replace(',', '-')}"
        r = prune(work / f"{raw.name}.deepfwfm" / "best.pt", hashed, work / f"{raw.name}.{run}", pcfg)
        results[run] = r
        rows.append((f"DeepFwFM pruned {mode} (dnn {dnn}, R {field}, emb {emb})", r,
                     r["history"][-1]["samples_per_s"], r["pruning"]["nonzero"]["total"]))
    orc = oracle(a.dataset, ingested, truth_path) if truth_path else None
    planted = load_truth(truth_path)["planted_pairs"] if truth_path else []  # [field, field, strength]
    lines = [f"Data: {tag}; split 80/10/10 random (seed 0); vocabulary min-count {a.min_count} on train; "
             f"up to {a.epochs} epochs, early stopping on valid AUC (patience 2)."]
    if orc is not None:
        lines.append(f"Oracle test AUC (generator's true click probabilities): **{orc:.4f}**")
    lines += ["", "| model | test AUC | test logloss | valid AUC | best epoch | params (nonzero) | train samples/s |",
              "|---|---|---|---|---|---|---|"]
    for name, r, sps, params in rows:
        lines.append(f"| {name} | {r['test']['auc']:.4f} | {r['test']['logloss']:.4f} | {r['valid']['auc']:.4f} | "
                     f"{r['best_epoch'] + 1} | {params:,} | {sps:,.0f} |")
    pruned = [(k, r) for k, r in results.items() if k.startswith("pruned-")]
    if pruned and "deepfwfm" in results:
        lines.append("")
        dense_test = results["deepfwfm"]["test"]["auc"]
        for k, r in pruned:
            kept = [p["pair"] for p in r["pruning"]["kept_pairs"]]
            line = (f"{k}: test AUC {r['test']['auc'] - dense_test:+.4f} vs dense; sparsity "
                    + ", ".join(f"{c} {v:.4f}" for c, v in r["pruning"]["sparsity"].items())
                    + f"; {len(kept)} pairs kept, strongest: {', '.join(kept[:6])}")
            if planted:
                top = {frozenset(p.split(" x ")) for p in kept[:2 * len(planted)]}
                hit = sum(frozenset(p[:2]) in top for p in planted)
                line += f"; planted pairs among the top {2 * len(planted)}: {hit}/{len(planted)}"
            lines.append(f"- {line}")
    if "deepfwfm" in results:
        d = results["deepfwfm"]
        epoch_s = (SplitLoader(hashed, "train").rows / d["history"][d["best_epoch"]]["samples_per_s"])
        share = loader_share(hashed, cfg.train.batch_size, epoch_s)
        lines.append("")
        lines.append(f"DeepFwFM training, batch 2048: loader-only pass = {share:.1%} of a training epoch's time "
                     "(data loading is not the bottleneck when this is small).")
    text = "\n".join(lines)
    print(text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}-{raw.name}.md").write_text(text + "\n")
    Path(f"{out}-{raw.name}.json").write_text(json.dumps(
        {"oracle_auc": orc, "results": {k: {kk: vv for kk, vv in v.items() if kk != "history"}
                                        for k, v in results.items()}}, indent=2, default=str))


if __name__ == "__main__":
    main()
