"""Inference benchmark: dense / pruned DeepFwFM in PyTorch eager vs the compact engine, end to end, one thread.

    python bench/inference.py --synthetic                      # Criteo-shaped random model, pruned here
    python bench/inference.py --dense D.pt --pruned P.pt --data data/hashed   # real checkpoints (+ test AUC)
    python bench/inference.py --synthetic --profile            # + time per engine stage (lookups, pairs, DNN)
    python bench/inference.py --sweep-density                  # sparse-vs-dense layer crossover (thresholds)

One process, one thread everywhere (torch, BLAS, numba, onnxruntime). Each (config, batch) cell is timed for
~`--budget` s per round; rounds interleave all cells (in a shuffled order) so machine noise hits all alike, and
the table reports medians. Inputs are fresh rows on every call (a pool of ids), so no call re-reads the rows of
the previous one. Speedups are ratios within this run. The "floor" rows are the physical limit: kernels that
only fetch the same random embedding rows of the pruned model's table (numba: same tiling and prefetching as
the engine; numpy: one fancy-indexing gather) and sum them.

Writes the Markdown table and JSON to --out (default bench/out/inference.{md,json}).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy / torch load their thread pools

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deeplight.serve.kernels as kernels  # noqa: E402
from deeplight.serve.engine import CompactModel  # noqa: E402
from deeplight.model.deepfwfm import DeepFwFM  # noqa: E402

BATCHES = (1, 64, 512, 4096)
# Criteo-shaped vocabulary of ~1M rows: 13 bucketised numeric fields + 26 categorical ones (the schema's
# cardinality hints, the larger ones doubled).
_CAT = [1400, 550, 100_000, 50_000, 300, 24, 12_000, 630, 3, 30_000, 5_600, 80_000, 3_200, 27, 15_000, 60_000,
        10, 5_600, 2_200, 4, 70_000, 18, 15, 40_000, 105, 30_000]
CRITEO_SIZES = [64] * 13 + [2 * c if c >= 1000 else c for c in _CAT]
GOALS = {"b1_vs_eager": 46.0, "b1_vs_dense_compact": 10.0, "b4096_vs_eager": 10.0, "b4096_samples_per_s": 1e6}


# ---------------------------------------------------------------------------------------------------------------
# Models


def synthetic_dense(seed: int = 0) -> DeepFwFM:
    """DeepFwFM(Criteo sizes, dim 10, DNN 400x3) with random weights; r ~ N(0, 1) so pair magnitudes differ."""
    torch.manual_seed(seed)
    model = DeepFwFM(CRITEO_SIZES, kind="deepfwfm", embed_dim=10, dnn=(400, 400, 400)).eval()
    with torch.no_grad():
        model.interaction.r.normal_(0.0, 1.0)
        model.bias.fill_(-1.0)
    return model


def _clone(model: DeepFwFM) -> DeepFwFM:
    m = DeepFwFM.from_spec(model.spec).eval()
    m.load_state_dict(model.state_dict())
    return m


def _drop_pairs(model: DeepFwFM, frac: float) -> None:
    w = model.interaction.weights().abs()
    drop = torch.argsort(w)[:int(frac * w.numel())]
    model.interaction.pair_mask[drop] = 0.0
    model.interaction.r[drop] = 0.0


@torch.no_grad()
def prune_paper(model: DeepFwFM) -> DeepFwFM:
    """The paper's setting by magnitude: 90% of each hidden layer's weights (not the output layer), 90% of
    field pairs, 40% of embedding entries (global threshold)."""
    m = _clone(model)
    for layer in m.dnn.layers[:-1]:
        w = layer.weight
        w[w.abs() <= w.abs().flatten().kthvalue(int(0.9 * w.numel())).values] = 0.0
    _drop_pairs(m, 0.9)
    E = m.embedding.table.weight
    E[E.abs() <= E.abs().flatten().kthvalue(int(0.4 * E.numel())).values] = 0.0
    return m


@torch.no_grad()
def prune_structured(model: DeepFwFM, neurons: float = 0.9, pairs: float = 0.95, rows: float = 0.6) -> DeepFwFM:
    """High-sparsity structured: 90% of each hidden layer's neurons (smallest incoming-row norm; row, bias and
    the next layer's column zeroed), 95% of pairs, 60% of embedding rows (smallest norm)."""
    m = _clone(model)
    layers = m.dnn.layers
    for k in range(len(layers) - 1):
        drop = torch.argsort(layers[k].weight.norm(dim=1))[:int(neurons * layers[k].weight.shape[0])]
        layers[k].weight[drop] = 0.0
        layers[k].bias[drop] = 0.0
        layers[k + 1].weight[:, drop] = 0.0
    _drop_pairs(m, pairs)
    E = m.embedding.table.weight
    E[torch.argsort(E.norm(dim=1))[:int(rows * E.shape[0])]] = 0.0
    return m


def load_checkpoint(path: str) -> tuple[DeepFwFM, dict]:
    """(model in eval mode, the checkpoint's state dict)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = DeepFwFM.from_spec(state["spec"]).eval()
    model.load_state_dict(state["model"])
    return model, state


def pruned_label(state: dict, index: int | None) -> str:
    """'pruned structured 95/98.65/60' from the checkpoint's pruning config (targets in %), else 'pruned<k>'."""
    try:
        p = json.loads(state["config"])["prune"]
        return f"pruned {p['mode']} " + "/".join(f"{round(100 * p[k], 2):g}" for k in ("dnn", "field", "embedding"))
    except (KeyError, TypeError, ValueError):
        return f"pruned{'' if index is None else index + 1}"


# ---------------------------------------------------------------------------------------------------------------
# Physical limit: fetch the rows only


@numba.njit(cache=True, nogil=True)
def _fetch_rows(ids, table, base, width, out):  # type: ignore[no-untyped-def]
    """Sum of the looked-up rows per sample and nothing else, fetched the way the compact kernels do: one
    sample alone with all its rows prefetched first; batches in tiles, field by field, PREFETCH rows ahead
    (2x faster than sample by sample on this machine)."""
    B, F = ids.shape
    if B == 1:
        for f in range(F):
            kernels._prefetch(table, base[f] + ids[0, f] * width[f])
    tile = min(B, kernels.TILE)
    for t0 in range(0, B, tile):
        T = min(tile, B - t0)
        acc = out[t0:t0 + T]
        acc[:] = 0.0
        for f in range(F):
            w, bo = width[f], base[f]
            if w == 0:
                continue
            col = ids[t0:t0 + T, f]
            for t in range(T):
                if B > 1 and t + kernels.PREFETCH < T:
                    kernels._prefetch(table, bo + col[t + kernels.PREFETCH] * w)
                o = bo + col[t] * w
                row = table[o:o + w]
                s = np.float32(0.0)
                for d in range(w):
                    s += row[d]
                acc[t] += s


def _fetch_rows_numpy(cm: CompactModel) -> Callable[[np.ndarray], np.ndarray]:
    """The same fetch as one numpy fancy-indexing gather (what the numpy backend does)."""
    c = cm._cols

    def fetch(ids: np.ndarray) -> np.ndarray:
        return cm.table[ids[:, c["col_field"]] * c["col_width"] + c["col_off"]].sum(1)
    return fetch


# ---------------------------------------------------------------------------------------------------------------
# Timing


def make_pool(sizes: list[int], rows: int, seed: int, data_ids: np.ndarray | None) -> np.ndarray:
    if data_ids is not None:
        rng = np.random.default_rng(seed)
        return np.ascontiguousarray(data_ids[rng.integers(0, len(data_ids), rows)], dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, s, rows) for s in sizes], axis=1).astype(np.int64)


def call_fn(kind: str, obj: Any, B: int) -> Callable[[Any], Any]:
    """What one call of a config does on one prepared input."""
    if kind == "eager":
        def eager(x: Any) -> Any:
            with torch.inference_mode():
                return obj(x)
        return eager
    if kind == "floor":
        table, base, width = obj.table, obj.field_base, obj.field_width
        out = np.empty(B, np.float32)
        return lambda x: _fetch_rows(x, table, base, width, out)
    if kind == "floor-numpy":
        return _fetch_rows_numpy(obj)
    if B == 1 and kind == "numba":
        return obj.score_one
    backend = kind
    return lambda x: obj.score(x, backend=backend)


def prepare_inputs(kind: str, pool: np.ndarray, B: int, n: int) -> list[Any]:
    batches = [pool[(i * B) % (len(pool) - B + 1):][:B] for i in range(n)]
    if kind == "eager":
        return [torch.from_numpy(np.ascontiguousarray(b)) for b in batches]
    if kind == "numba" and B == 1:
        return [np.ascontiguousarray(b[0]) for b in batches]
    return [np.ascontiguousarray(b) for b in batches]


def run_timings(cells: dict[tuple[str, int], tuple[str, Any]], pool: np.ndarray, rounds: int, budget: float,
                seed: int) -> dict[tuple[str, int], dict[str, float]]:
    """cells: (config, batch) -> (kind, object). Median seconds per call over interleaved rounds."""
    prepared = {}
    for (name, B), (kind, obj) in cells.items():
        fn = call_fn(kind, obj, B)
        fn(prepare_inputs(kind, pool, B, 1)[0])  # warm up (numba compile/load, ORT init)
        t = time.perf_counter()
        fn(prepare_inputs(kind, pool, B, 1)[0])
        once = max(time.perf_counter() - t, 1e-6)
        n = int(min(max(budget / once, 3), 20_000))
        prepared[(name, B)] = (fn, prepare_inputs(kind, pool, B, n))
    times: dict[tuple[str, int], list[float]] = {k: [] for k in cells}
    rng = np.random.default_rng(seed)
    keys = list(cells)
    for r in range(rounds):
        for i in rng.permutation(len(keys)):
            fn, inputs = prepared[keys[i]]
            t = time.perf_counter()
            for x in inputs:
                fn(x)
            times[keys[i]].append((time.perf_counter() - t) / len(inputs))
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr)
    return {k: {"median_s": float(np.median(v)), "min_s": float(np.min(v)), "rounds": len(v)}
            for k, v in times.items()}


# ---------------------------------------------------------------------------------------------------------------
# AUC on the hashed test split


def read_test_split(data_dir: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    names = list(manifest["field_names"])
    ids, labels = [], []
    for path in sorted((Path(data_dir) / "test").glob("*.parquet")):
        table = pq.read_table(path, columns=[*names, "label"])
        ids.append(np.stack([table[n].to_numpy() for n in names], axis=1).astype(np.int64))
        labels.append(table["label"].to_numpy().astype(np.float64))
    X, y = np.concatenate(ids), np.concatenate(labels)
    return (X[:limit], y[:limit]) if limit else (X, y)


def test_auc(kind: str, obj: Any, ids: np.ndarray, labels: np.ndarray) -> float:
    from deeplight.model.metrics import auc

    scores = []
    for s in range(0, len(ids), 4096):
        chunk = ids[s:s + 4096]
        if kind == "eager":
            with torch.inference_mode():
                scores.append(obj(torch.from_numpy(chunk)).numpy())
        else:
            scores.append(obj.score(chunk, backend=kind))
    return float(auc(labels, np.concatenate(scores)))


# ---------------------------------------------------------------------------------------------------------------
# Density sweep (thresholds in deeplight/serve/engine.py)


def sweep_density(rounds: int, budget: float, seed: int) -> str:
    """Same model at several DNN densities, every layer forced sparse vs forced dense; small tables, so the
    lookups are cache hits and the difference is the layer kernels."""
    sizes = [100] * 39
    rng_pool = make_pool(sizes, 1 << 16, seed, None)
    lines = ["| density | B=1 dense us | B=1 CSC us | CSC/dense | B=4096 dense us | B=4096 CSR us | CSR/dense |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for density in (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5):
        torch.manual_seed(seed)
        model = DeepFwFM(sizes, embed_dim=10, dnn=(400, 400, 400)).eval()
        with torch.no_grad():
            model.interaction.pair_mask.zero_()
            for layer in model.dnn.layers[:-1]:
                w = layer.weight
                w[w.abs() <= w.abs().flatten().kthvalue(max(1, int((1 - density) * w.numel()))).values] = 0.0
        cms = {}
        for fmt, thr in (("dense", 0.0), ("sparse", 1.0)):
            kernels.CSR_MAX_DENSITY = kernels.CSC_MAX_DENSITY = thr
            cms[fmt] = CompactModel.from_model(model)
        cells = {(fmt, B): ("numba", cm) for fmt, cm in cms.items() for B in (1, 4096)}
        t = run_timings(cells, rng_pool, rounds, budget, seed)
        us = {k: v["median_s"] * 1e6 for k, v in t.items()}
        lines.append(f"| {density:.2f} | {us[('dense', 1)]:.1f} | {us[('sparse', 1)]:.1f} | "
                     f"{us[('sparse', 1)] / us[('dense', 1)]:.2f} | {us[('dense', 4096)]:.0f} | "
                     f"{us[('sparse', 4096)]:.0f} | {us[('sparse', 4096)] / us[('dense', 4096)]:.2f} |")
        print(lines[-1], file=sys.stderr)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Profile: where the compact engine's time goes


def _without(cm: CompactModel, pairs: bool, dnn: bool) -> CompactModel:
    """The same compact model (same table) minus its pairs and/or DNN."""
    keep = slice(None) if pairs else slice(0, 0)
    return CompactModel(cm.field_names, cm.field_sizes, cm.table, cm.field_width, cm.field_dims, cm.pair_i[keep],
                        cm.pair_j[keep], cm.pair_w[keep], cm.pair_dim if pairs else 0, cm.bias,
                        cm.layers if dnn else [], cm.source)


def profile(compacts: dict[str, CompactModel], pool: np.ndarray, batches: list[int], rounds: int, budget: float,
            seed: int) -> str:
    """Per-sample cost of each stage, as differences of the same model with stages removed (one run)."""
    cells = {}
    for name, cm in compacts.items():
        stages = {"lookups": _without(cm, False, False), "+pairs": _without(cm, True, False), "+dnn": cm}
        for stage, v in stages.items():
            for B in batches:
                cells[(f"{name}|{stage}", B)] = ("numba", v)
    t = run_timings(cells, pool, rounds, budget, seed)
    lines = ["| model | batch | lookups + linear us/sample | pairs us/sample | DNN us/sample | total us/sample |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in compacts:
        for B in batches:
            a, b, c = (t[(f"{name}|{s}", B)]["median_s"] * 1e6 / B for s in ("lookups", "+pairs", "+dnn"))
            lines.append(f"| {name} | {B} | {a:.2f} | {b - a:.2f} | {c - b:.2f} | {c:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Main


def fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", action="store_true", help="random Criteo-shaped model, pruned two ways here")
    ap.add_argument("--dense", help="dense checkpoint (.pt: {'spec', 'model'})")
    ap.add_argument("--pruned", action="append", default=[], help="pruned checkpoint (repeatable)")
    ap.add_argument("--data", help="hashed dataset dir: ids from its test split, and the test AUC per config")
    ap.add_argument("--auc-rows", type=int, default=None, help="limit test rows used for AUC")
    ap.add_argument("--sweep-density", action="store_true", help="time sparse vs dense layer kernels")
    ap.add_argument("--profile", action="store_true", help="also time the engine's stages (lookups, pairs, DNN)")
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget", type=float, default=0.15, help="seconds per cell per round")
    ap.add_argument("--alternatives", action="store_true", help="also time the numpy and onnx backends")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/out/inference")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    if args.sweep_density:
        table = sweep_density(args.rounds, args.budget, args.seed)
        print(table)
        out.with_name(out.name + "_density.md").write_text(table + "\n")
        return 0

    if not args.synthetic and not args.dense:
        ap.error("give --synthetic or --dense CKPT [--pruned CKPT ...]")
    if args.synthetic:
        dense = synthetic_dense(args.seed)
        models = {"dense": dense, "paper": prune_paper(dense), "structured": prune_structured(dense)}
    else:
        models = {"dense": load_checkpoint(args.dense)[0]}
        for i, p in enumerate(args.pruned):
            model, state = load_checkpoint(p)
            models[pruned_label(state, i if len(args.pruned) > 1 else None)] = model
    sizes = list(models["dense"].spec["field_sizes"])
    data_ids = labels = None
    if args.data:
        data_ids, labels = read_test_split(args.data, args.auc_rows)
    compacts = {name: CompactModel.from_model(m) for name, m in models.items()}

    cells: dict[tuple[str, int], tuple[str, Any]] = {}
    for name in models:
        for B in args.batches:
            cells[(f"{name} eager", B)] = ("eager", models[name])
            cells[(f"{name} compact", B)] = ("numba", compacts[name])
            if args.alternatives or name != "dense":
                cells[(f"{name} compact-numpy", B)] = ("numpy", compacts[name])
                cells[(f"{name} compact-onnx", B)] = ("onnx", compacts[name])
    floor_of = compacts[[n for n in compacts if n != "dense"][0]] if len(compacts) > 1 else compacts["dense"]
    for B in args.batches:
        cells[("floor: fetch rows only (numba)", B)] = ("floor", floor_of)
        cells[("floor: fetch rows only (numpy)", B)] = ("floor-numpy", floor_of)
    pool = make_pool(sizes, max(1 << 17, 8 * max(args.batches)), args.seed + 1, data_ids)
    print(f"timing {len(cells)} cells x {args.rounds} rounds ...", file=sys.stderr)
    timings = run_timings(cells, pool, args.rounds, args.budget, args.seed)

    prof = ""
    if args.profile:
        print("profiling stages ...", file=sys.stderr)
        prof = profile(compacts, pool, [b for b in args.batches if b in (1, 4096)] or args.batches[-1:],
                       args.rounds, args.budget, args.seed)

    aucs = {}
    if data_ids is not None:
        for name in models:
            aucs[f"{name} eager"] = test_auc("eager", models[name], data_ids, labels)
            aucs[f"{name} compact"] = test_auc("numba", compacts[name], data_ids, labels)

    # Table
    def us(cfg: str, B: int) -> float:
        return timings[(cfg, B)]["median_s"] * 1e6

    configs = list(dict.fromkeys(c for c, _ in cells))
    head = "| config | batch | us / call | samples/s | vs dense eager | vs dense compact |" + \
        (" test AUC |" if aucs else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    rows = []
    for B in args.batches:
        for cfg in configs:
            t = us(cfg, B)
            row = {"config": cfg, "batch": B, "us_per_call": t, "samples_per_s": B / t * 1e6,
                   "vs_dense_eager": us("dense eager", B) / t, "vs_dense_compact": us("dense compact", B) / t,
                   "auc": aucs.get(cfg)}
            rows.append(row)
            auc_col = f" {row['auc']:.5f} |" if row["auc"] is not None else (" |" if aucs else "")
            lines.append(f"| {cfg} | {B} | {t:,.1f} | {fmt_rate(row['samples_per_s'])} | "
                         f"{row['vs_dense_eager']:.1f}x | {row['vs_dense_compact']:.1f}x |{auc_col}")
    goal_lines = ["", "Goals (pruned compact, numba backend):", ""]
    for name in models:
        if name == "dense":
            continue
        cfg = f"{name} compact"
        checks = []
        if 1 in args.batches:
            checks += [("batch 1 vs dense eager", us("dense eager", 1) / us(cfg, 1), GOALS["b1_vs_eager"]),
                       ("batch 1 vs dense compact", us("dense compact", 1) / us(cfg, 1), GOALS["b1_vs_dense_compact"])]
        if 4096 in args.batches:
            checks += [("batch 4096 vs dense eager", us("dense eager", 4096) / us(cfg, 4096),
                        GOALS["b4096_vs_eager"]),
                       ("batch 4096 samples/s", 4096 / us(cfg, 4096) * 1e6, GOALS["b4096_samples_per_s"])]
        for what, got, goal in checks:
            verdict = "met" if got >= goal else f"missed ({got / goal:.0%} of goal)"
            shown = fmt_rate(got) if "samples" in what else f"{got:.1f}x"
            goal_s = fmt_rate(goal) if "samples" in what else f"{goal:.0f}x"
            goal_lines.append(f"- {name}: {what}: {shown} (goal {goal_s}) - {verdict}")
    stats = {name: cm.stats() for name, cm in compacts.items()}
    stat_lines = ["", "| model | lookups | kept dims | kept pairs | DNN layers (out x in, density) | "
                      "table MB | DNN KB | FLOPs/sample |", "|---|---:|---:|---:|---|---:|---:|---:|"]
    for name, s in stats.items():
        layers = ", ".join(f"{a}x{b} ({r['density']:.2f} {r['batch_format']})"
                           for r in s["dnn_layers"] for a, b in [r["shape"]])
        stat_lines.append(f"| {name} | {s['lookups_per_sample']} | {s['kept_dims']} | {s['kept_pairs']} | "
                          f"{layers or '-'} | {s['bytes']['table'] / 1e6:.1f} | {s['bytes']['dnn'] / 1e3:.0f} | "
                          f"{s['flops_per_sample']['total']:,} |")
    load = os.getloadavg()
    env = {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "loadavg_end": load, "torch": torch.__version__, "numpy": np.__version__,
           "numba": numba.__version__, "threads": 1, "rounds": args.rounds, "budget_s": args.budget,
           "ids": "test split" if args.data else "uniform random per field",
           "tile": kernels.TILE, "prefetch": kernels.PREFETCH,
           "csr_max_density": kernels.CSR_MAX_DENSITY, "csc_max_density": kernels.CSC_MAX_DENSITY}
    md = "\n".join([f"# Inference benchmark ({'synthetic' if args.synthetic else 'checkpoints'}, one thread, "
                    f"medians of {args.rounds} interleaved rounds; load average at end {load[0]:.1f})", "",
                    *lines, *goal_lines, *stat_lines,
                    *(["", "Stages of the compact engine (same model with stages removed; medians):", "", prof]
                      if prof else []), ""])
    print(md)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows, "stats": stats, "aucs": aucs,
                                                     "timings": {f"{c}|{b}": v for (c, b), v in timings.items()}},
                                                    indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
