"""Training past one process, faster per core (issue 20): optimiser throughput and 1 vs N ranks.

    # one thread, synthetic Criteo (synth -> ingest -> hash made once under --work)
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \\
        .venv/bin/python bench/scale.py optimizers --rows 1000000 [--buckets 26000] --work bench/out/scale
    OMP_NUM_THREADS=1 .venv/bin/python bench/scale.py ranks --rows 300000 --work bench/out/scale

`optimizers`: the step split into forward / backward / optimiser time for each `train.embedding_optimizer`, then a
full training run (early stopping on valid AUC) per setting in the same process: samples/s, valid and test AUC.
`ranks`: the same training with 1 process and with 2 ranks under torchrun (gloo), same global batch: step time,
valid AUC and the all-reduce payload per step (sparse embedding rows vs the dense all-reduce it replaces).
Thread pools are pinned with torch.set_num_threads(1) (train.threads=1) and the env vars above.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deeplight.base.config import Config  # noqa: E402
from deeplight.data.hashing import hash_dataset  # noqa: E402
from deeplight.data.ingest import ingest  # noqa: E402
from deeplight.data.loader import SplitLoader, read_manifest  # noqa: E402
from deeplight.data.synth import synthesize  # noqa: E402
from deeplight.model.deepfwfm import DeepFwFM  # noqa: E402
from deeplight.model.sparse_optim import EMBEDDING_OPTIMIZERS  # noqa: E402
from deeplight.model.train import make_optimizer, train  # noqa: E402


def synthetic_hashed(work: Path, rows: int, buckets: int | None = None) -> Path:
    """synth -> ingest -> hash of `rows` synthetic Criteo rows, made once under `work`: a vocabulary of values
    seen 8 times (the default), or `buckets` ids per field (39 x 26,000 = a Criteo-sized ~1M-row table)."""
    raw = work / f"synth-criteo-{rows}.txt"
    ingested = work / f"{raw.name}.ingested"
    hashed = work / f"{raw.name}.{'b%d' % buckets if buckets else 'vocab'}.hashed"
    work.mkdir(parents=True, exist_ok=True)
    if not raw.exists():
        synthesize("criteo", rows=rows, seed=0, out=str(raw))
    if not (ingested / "report.json").exists():
        ingest("criteo", [str(raw)], str(ingested), seed=0)
    if not (hashed / "manifest.json").exists():
        hash_dataset(str(ingested), str(hashed), **({"buckets": buckets} if buckets else {"min_count": 8}))
    return hashed


def step_phases(hashed: Path, cfg: Config, steps: int = 30) -> dict[str, float]:
    """Mean ms per training step spent in forward, backward and the optimiser step (after 5 warm-up steps)."""
    torch.manual_seed(0)
    model = DeepFwFM.from_config(read_manifest(hashed)["field_sizes"], cfg.model).train()
    opt = make_optimizer(model, cfg.train, cfg.train.lr)
    loader = SplitLoader(hashed, "train", batch_size=cfg.train.batch_size, shuffle=True, seed=0)
    spent = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    for k, (ids, y) in enumerate(loader.epoch(0)):
        if k == steps + 5:
            break
        t0 = time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(ids), y)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if k >= 5:
            for name, dt in zip(spent, (t1 - t0, t2 - t1, t3 - t2)):
                spent[name] += dt * 1000 / steps
    spent["total"] = sum(spent.values())
    return spent


def _run_summary(result: dict, started: float) -> dict:
    """What both parts report of one training run: AUCs, best epoch, mean samples/s over its epochs, wall time."""
    hist = result["history"]
    return {"valid_auc": result["valid"]["auc"], "test_auc": result["test"]["auc"],
            "best_epoch": result["best_epoch"], "samples_per_s": sum(h["samples_per_s"] for h in hist) / len(hist),
            "wall_s": time.perf_counter() - started}


def optimizers(hashed: Path, work: Path, cfg: Config) -> list[dict]:
    """Step phases and one full training run per embedding optimiser, in this one process."""
    rows = []
    for kind in EMBEDDING_OPTIMIZERS:
        c = cfg.replace(**{"train.embedding_optimizer": kind})
        phases = step_phases(hashed, c)
        print(f"{kind}: step phases ms {json.dumps({k: round(v, 1) for k, v in phases.items()})}", flush=True)
        started = time.perf_counter()
        r = train(hashed, work / f"train-{kind}", c)
        row = {"embedding_optimizer": kind, "phases_ms": phases, "epochs_run": r["epochs_run"],
               **_run_summary(r, started)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    base = rows[0]
    for row in rows[1:]:
        print(f"{row['embedding_optimizer']} vs {base['embedding_optimizer']}: "
              f"{row['samples_per_s'] / base['samples_per_s']:.2f}x samples/s, valid AUC "
              f"{row['valid_auc'] - base['valid_auc']:+.4f}, test AUC {row['test_auc'] - base['test_auc']:+.4f}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["optimizers", "ranks"])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--work", default=str(REPO / "bench" / "out" / "scale"))
    ap.add_argument("--buckets", type=int, help="hash into this many ids per field instead of a vocabulary")
    ap.add_argument("--hashed", help="an existing hashed dataset instead of synthetic rows")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--embedding-optimizer", default=Config().train.embedding_optimizer,
                    help="ranks: train.embedding_optimizer of both runs")
    ap.add_argument("--out-json", help="write the rows here")
    a = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(a.work)
    hashed = Path(a.hashed) if a.hashed else synthetic_hashed(work, a.rows, a.buckets)
    cfg = Config().replace(**{"train.threads": 1, "train.epochs": a.epochs, "train.device": "cpu",
                              "train.embedding_optimizer": a.embedding_optimizer})
    print(f"load average at start: {os.getloadavg()}", flush=True)
    rows = optimizers(hashed, work / hashed.name, cfg) if a.part == "optimizers" else ranks(hashed, work, cfg)
    print(f"load average at end: {os.getloadavg()}", flush=True)
    if a.out_json:
        Path(a.out_json).write_text(json.dumps(rows, indent=1))


def ranks(hashed: Path, work: Path, cfg: Config, counts: tuple[int, ...] = (1, 2)) -> list[dict]:
    """The same `deeplight train` (same global batch) in one process and as N torchrun ranks (gloo, 127.0.0.1),
    one after the other: valid AUC, samples/s, step time and the gradient bytes each rank sends per step."""
    flags = ["--no-mlflow", "--threads", "1", "--epochs", str(cfg.train.epochs), "--set",
             f"train.embedding_optimizer={cfg.train.embedding_optimizer}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "GLOO_SOCKET_IFNAME": "lo", "TQDM_DISABLE": "1"}
    rows = []
    for n in counts:
        out = work / f"{hashed.name}.ranks-{n}"
        launcher = [sys.executable, "-m", "deeplight"] if n == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
            "--master_port", "29517", "-m", "deeplight"]
        started = time.perf_counter()
        subprocess.run([*launcher, "train", "--data", str(hashed), "--out", str(out), *flags], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        r = json.loads((out / "results.json").read_text())
        summary = _run_summary(r, started)
        row = {"ranks": n, **summary, "global_batch": r["batch_size"],
               "step_ms": 1000 * r["batch_size"] / summary["samples_per_s"],
               **{k: v for k, v in r.get("distributed", {}).items() if k != "rank_digests"}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    base = rows[0]
    for row in rows[1:]:
        print(f"{row['ranks']} ranks vs 1: {row['samples_per_s'] / base['samples_per_s']:.2f}x samples/s, valid AUC "
              f"{row['valid_auc'] - base['valid_auc']:+.4f}; gradient bytes per step per rank "
              f"{row['allreduce_bytes_per_step']:,.0f} vs {row['dense_allreduce_bytes_per_step']:,.0f} dense "
              f"({row['dense_allreduce_bytes_per_step'] / row['allreduce_bytes_per_step']:.1f}x less)")
    return rows


if __name__ == "__main__":
    main()
