"""Evaluate a dense or pruned checkpoint on a split of its hashed dataset: quality, speed, size, sparsity, plots.

    from deeplight.evaluation.evaluate import evaluate_model
    m = evaluate_model("out/pruned", "data/hashed", split="test", out_json="out/eval.json", plots_dir="out/plots")
    m["auc"], m["latency_us"]["1"], m["model_bytes"], m["sparsity"]["field"], m["kept_pairs"][:3]

The model is scored the way it is served: compacted (`deeplight.serve.engine.CompactModel`, numba backend), so the
AUC is the AUC of what ships and the latency is the engine's. Latency is the median over interleaved rounds of
the mean time per call at batch 1 (`score_one`) and batch 4096 (`score`), one thread (BLAS pinned with
threadpoolctl), on fresh rows of the split each call; it covers scoring hashed ids, not parsing raw rows.
`model_bytes` is the size of `compact.npz` on disk. Parameter counts and sparsity are those of the checkpoint's
DeepFwFM (exact zeros). `ece` is the expected calibration error over 10 quantile bins (model/metrics.py);
`recalibrated` is 1 when pruning re-fitted a temperature and bias on the valid split (`calibration_refit` says
how), else 0. Plots (with `plots_dir`): `roc_curve.png`, `calibration_curve.png` (reliability diagram on log
axes, ECE in the legend, the dense model's curve beside it when `dense` is given) and `field_pairs.png`, a
heatmap of |R| (the field-pair weights; pruned pairs blank), next to the dense model's R when `dense` names the
dense checkpoint. `flat_metrics` gives the numbers as MLflow metric names.

    >>> flat = flat_metrics({"split": "test", "auc": 0.8, "latency_us": {"1": 9.5, "4096": 800.0},
    ...                      "sparsity": {"dnn": 0.9}, "kept_pairs": [{"pair": "C1 x C2"}]})
    >>> flat
    {'test_auc': 0.8, 'latency_us_b1': 9.5, 'latency_us_b4096': 800.0, 'sparsity_dnn': 0.9, 'kept_pairs': 1.0}
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from deeplight.base.errors import DeeplightError

LATENCY_BATCHES = (1, 4096)
POOL_ROWS = 65_536  # rows the latency calls cycle through (~20 MB for Criteo)
_PER_SPLIT = ("auc", "logloss", "ece", "calibration", "mean_pred", "observed_ctr", "rows")
_SCALARS = ("samples_per_s", "params_total", "params_nonzero", "model_bytes", "recalibrated")


def resolve_checkpoint(model: str | Path) -> Path:
    """A checkpoint file, or a directory holding `best.pt` (what `deeplight train` / `prune` write)."""
    path = Path(model)
    if path.is_dir():
        if not (path / "best.pt").is_file():
            raise DeeplightError(f"{model}: directory holds no best.pt (pass a checkpoint file or a train/prune "
                                 "output directory)")
        return path / "best.pt"
    if not path.is_file():
        raise DeeplightError(f"{model}: no such checkpoint file or directory")
    return path


def load_checkpoint_model(checkpoint_path: str | Path) -> tuple[Any, dict[str, Any]]:
    """(DeepFwFM in eval mode, checkpoint dict)."""
    from deeplight.model.checkpoint import load_model

    return load_model(checkpoint_path)


def check_same_features(ck: dict[str, Any], manifest: dict[str, Any], checkpoint_path: Any, data_dir: Any) -> None:
    """Refuse a checkpoint trained with another feature map (or dataset) than `data_dir` holds."""
    want, got = ck.get("feature_map_fingerprint", ""), manifest.get("feature_map_fingerprint", "")
    if want != got:
        raise DeeplightError(f"{checkpoint_path} was trained with feature map {want[:12] or '?'}..., but {data_dir} "
                             f"was hashed with {got[:12] or '?'}...; evaluate it on the data it was trained on")
    if ck.get("field_names") and list(ck["field_names"]) != list(manifest["field_names"]):
        raise DeeplightError(f"{checkpoint_path} and {data_dir} have different fields")


def evaluate_model(checkpoint: str, data_dir: str, split: str = "test", out_json: str | None = None,
                   plots_dir: str | None = None, dense: str | None = None, latency_rounds: int = 5,
                   latency_budget_s: float = 0.2) -> dict:
    """The metrics JSON of a checkpoint (file or directory with best.pt) on `split` of a hashed dataset.

    Writes it to `out_json` and the plots to `plots_dir` when given. `dense`: the dense checkpoint a pruned
    model came from, drawn next to it in the field-pair heatmap. latency_rounds x latency_budget_s bounds the
    time spent timing each batch size.
    """
    from deeplight.serve.engine import CompactModel
    from deeplight.data.loader import read_manifest
    from deeplight.base.files import file_sha256, write_json
    from deeplight.model.prune import kept_pairs, nonzero_counts, sparsity
    from deeplight.base.provenance import code_version

    ckpt = resolve_checkpoint(checkpoint)
    manifest = read_manifest(data_dir)
    model, ck = load_checkpoint_model(ckpt)
    check_same_features(ck, manifest, ckpt, data_dir)
    names = list(manifest["field_names"])
    cfg = json.loads(ck.get("config") or "{}")
    pruned = bool((ck.get("extra") or {}).get("masks"))
    mode = cfg.get("prune", {}).get("mode", "unstructured")

    cm = CompactModel.from_model(model, names)
    ids, labels, probs, scored = _score(cm, data_dir, split, latency_rounds, latency_budget_s)
    pairs = kept_pairs(model, names)
    n_fields = len(names)
    result: dict[str, Any] = {
        "checkpoint": str(ckpt), "data_dir": str(data_dir), "split": split,
        "checkpoint_sha256": file_sha256(ckpt),  # which model these numbers are of (`register --metrics` checks)
        "dataset": manifest.get("dataset", ck.get("dataset", "")), "model_kind": ck["spec"]["kind"],
        "pruned": pruned, "prune_targets": {k: cfg["prune"][k] for k in ("dnn", "field", "embedding")}
        if pruned and "prune" in cfg else None, "prune_mode": mode if pruned else None,
        **scored,
        "recalibrated": int(bool((ck.get("calibration") or {}).get("applied"))),
        "calibration_refit": ck.get("calibration"),
        "params_total": int(model.param_counts()["total"]),
        "params_nonzero": int(nonzero_counts(model)["total"]),
        "sparsity": sparsity(model, mode),
        "kept_pairs": pairs, "total_pairs": n_fields * (n_fields - 1) // 2 if model.interaction is not None else 0,
        **_data_identity(manifest, split),
        "code_version": code_version(),
    }
    if plots_dir is not None:
        dense_model = load_checkpoint_model(resolve_checkpoint(dense))[0] if dense else None
        plots = write_plots(Path(plots_dir), labels, probs, model, names, dense_model, ids)
        result["plots"] = [str(p) for p in plots]
    if out_json is not None:
        write_json(out_json, result)
    return result


def evaluate_compact(compact_path: str | Path, data_dir: str, split: str = "test", out_json: str | None = None,
                     plots_dir: str | None = None, latency_rounds: int = 5, latency_budget_s: float = 0.2,
                     model: str = "", feature_map: str | Path | None = None) -> dict:
    """The metrics JSON of a compact engine file (what a registered model serves; no checkpoint) on `split` of a
    hashed dataset made with the model's own feature map: quality, calibration, latency and size as in
    `evaluate_model`, without what needs the torch model (sparsity by component, kept pairs, the R heatmap).
    `model` names it in the result (e.g. models:/deeplight-ctr@champion); `feature_map`: the model's own, which
    `data_dir` must have been hashed with (checked)."""
    from deeplight.base.files import write_json
    from deeplight.base.provenance import code_version
    from deeplight.data.loader import read_manifest
    from deeplight.serve.engine import CompactModel

    manifest = read_manifest(data_dir)
    if feature_map is not None:
        from deeplight.data.feature_map import FeatureMap

        want = FeatureMap.load(feature_map).fingerprint()
        if manifest.get("feature_map_fingerprint") != want:
            raise DeeplightError(f"{model or compact_path} maps features with {want[:12]}..., but {data_dir} was "
                                 f"hashed with {str(manifest.get('feature_map_fingerprint') or '?')[:12]}...; "
                                 "evaluate it on data hashed with its feature map, or on raw files (--input)")
    cm = CompactModel.load(compact_path)
    ids, labels, probs, scored = _score(cm, data_dir, split, latency_rounds, latency_budget_s)
    stats = cm.stats()
    result: dict[str, Any] = {
        "model": model or str(compact_path), "data_dir": str(data_dir), "split": split,
        "dataset": manifest.get("dataset", ""), **scored,
        "params_total": int(stats["params_total"]), "params_nonzero": int(stats["params_nonzero"]),
        **_data_identity(manifest, split), "code_version": code_version(),
    }
    if plots_dir is not None:
        result["plots"] = [str(p) for p in write_plots(Path(plots_dir), labels, probs, None, [])]
    if out_json is not None:
        write_json(out_json, result)
    return result


def _data_identity(manifest: dict[str, Any], split: str) -> dict[str, str]:
    fps = manifest.get("fingerprints", {})
    return {"eval_data_fingerprint": fps.get(split, ""),
            "data_fingerprint": f"{fps.get('train', '?')}:{fps.get('valid', '?')}",
            "feature_map_fingerprint": manifest.get("feature_map_fingerprint", "")}


def _score(cm: Any, data_dir: str | Path, split: str, latency_rounds: int, latency_budget_s: float
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """(ids, labels, probabilities, metrics) of a compact model on a split: quality, calibration curve, latency,
    throughput and size on disk."""
    from deeplight.model import metrics as mx

    ids, labels = _read_split(data_dir, split)
    probs = np.concatenate([cm.predict_proba(ids[s:s + 65_536]) for s in range(0, len(ids), 65_536)])
    mean_pred, observed, counts = mx.calibration_curve(labels, probs, bins=10)
    latency = measure_latency(cm, ids, rounds=latency_rounds, budget_s=latency_budget_s)
    with tempfile.TemporaryDirectory() as tmp:
        model_bytes = cm.save(Path(tmp) / "compact.npz").stat().st_size
    return ids, labels, probs, {
        **mx.evaluate_arrays(labels, probs),
        "calibration_curve": {"mean_pred": mean_pred.tolist(), "observed_ctr": observed.tolist(),
                              "rows": counts.tolist()},
        "latency_us": {str(b): latency[b] * 1e6 for b in LATENCY_BATCHES},
        "samples_per_s": LATENCY_BATCHES[-1] / latency[LATENCY_BATCHES[-1]],
        "latency_setup": {"backend": "numba", "threads": 1, "rounds": latency_rounds, "statistic": "median"},
        "model_bytes": int(model_bytes),
        "compact": {k: v for k, v in cm.stats().items() if k in ("params_total", "params_nonzero", "bytes",
                                                                   "kept_dims", "lookups_per_sample")},
    }


def raw_to_hashed(inputs: list[str], feature_map: str | Path, work_dir: str | Path,
                  max_bad_fraction: float = 0.5) -> tuple[str, dict[str, Any]]:
    """Raw files (another day's rows) -> a hashed dataset in `work_dir` whose test split holds every good row,
    mapped by the model's own `feature_map` (the `ingest --split 0,0,1` and `apply-features` steps). Returns
    (hashed dir, the ingest report: rows read, written and quarantined with reasons; bad rows are in
    work_dir/ingested/quarantine.jsonl)."""
    from deeplight.data.feature_map import FeatureMap
    from deeplight.data.hashing import apply_feature_map
    from deeplight.data.ingest import ingest

    fmap = FeatureMap.load(feature_map)
    work = Path(work_dir)
    report = ingest(fmap.dataset, [str(u) for u in inputs], str(work / "ingested"), split=(0.0, 0.0, 1.0),
                    split_mode="random", max_bad_fraction=max_bad_fraction)
    if not report["written"]:
        raise DeeplightError(f"{', '.join(map(str, inputs))}: no good rows to evaluate on")
    apply_feature_map(fmap, str(work / "ingested"), str(work / "hashed"))
    return str(work / "hashed"), report


def input_summary(inputs: list[str], report: dict[str, Any], quarantine: str | None) -> dict[str, Any]:
    """What an evaluation on raw files read: files, rows read/written/quarantined, reasons, the bad rows' file."""
    reasons: dict[str, int] = {}
    for item in report.get("inputs", []):
        for k, v in (item.get("reasons") or {}).items():
            reasons[k] = reasons.get(k, 0) + int(v)
    return {"files": [str(u) for u in inputs], "read": report["read"], "written": report["written"],
            "quarantined": report["quarantined"], "reasons": reasons, "quarantine": quarantine}


def flat_metrics(m: dict[str, Any]) -> dict[str, float]:
    """The numbers of an evaluation as flat MLflow metric names: `test_auc`, `latency_us_b1`, `sparsity_dnn`..."""
    split = m.get("split", "test")
    out = {f"{split}_{k}": float(m[k]) for k in _PER_SPLIT if isinstance(m.get(k), (int, float))}
    out |= {f"latency_us_b{b}": float(v) for b, v in (m.get("latency_us") or {}).items()}
    out |= {k: float(m[k]) for k in _SCALARS if isinstance(m.get(k), (int, float))}
    out |= {f"sparsity_{k}": float(v) for k, v in (m.get("sparsity") or {}).items()}
    if "kept_pairs" in m:
        out["kept_pairs"] = float(len(m["kept_pairs"]))
    return {k: v for k, v in out.items() if not math.isnan(v)}


# --- scoring and timing ----------------------------------------------------------------------------------

def _read_split(data_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    from deeplight.data.loader import SplitLoader

    loader = SplitLoader(data_dir, split, batch_size=65_536)
    if loader.rows == 0:
        raise DeeplightError(f"{data_dir}: split {split!r} is empty")
    parts = [(x.numpy(), y.numpy()) for x, y in loader.epoch(0)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _one_thread() -> contextlib.AbstractContextManager:
    """Pin BLAS (used by the batch kernel's dense layers) to one thread; the numba kernels are single-threaded."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is in the lock; timing then follows the process
        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


def measure_latency(cm: Any, ids: np.ndarray, rounds: int = 5, budget_s: float = 0.2, seed: int = 0
                    ) -> dict[int, float]:
    """Median seconds per call at each batch size of LATENCY_BATCHES (see the module docstring)."""
    if rounds < 1 or budget_s <= 0:
        raise DeeplightError("latency: rounds must be >= 1 and the budget > 0")
    rng = np.random.default_rng(seed)
    # A pool of real rows, each call takes the next rows of it: no call re-reads the rows of the previous one.
    pool = np.ascontiguousarray(ids[rng.integers(0, len(ids), POOL_ROWS)], dtype=np.int64)
    calls: dict[int, tuple[Callable[[np.ndarray], Any], list[np.ndarray]]] = {}
    with _one_thread():
        for b in LATENCY_BATCHES:
            fn: Callable[[np.ndarray], Any] = cm.score_one if b == 1 else cm.score

            def inputs(n: int, b: int = b) -> list[np.ndarray]:
                starts = (np.arange(n) * b) % (POOL_ROWS - b + 1)
                return [pool[s] if b == 1 else pool[s:s + b] for s in starts.tolist()]

            fn(inputs(1)[0])  # warm up: numba compiles or loads its cache
            t = time.perf_counter()
            fn(inputs(1)[0])
            once = max(time.perf_counter() - t, 1e-7)
            calls[b] = (fn, inputs(int(min(max(budget_s / once, 3), 20_000))))
        times: dict[int, list[float]] = {b: [] for b in LATENCY_BATCHES}
        for _ in range(rounds):
            for b in rng.permutation(LATENCY_BATCHES).tolist():  # interleaved: noise hits both alike
                fn, xs = calls[b]
                t = time.perf_counter()
                for x in xs:
                    fn(x)
                times[b].append((time.perf_counter() - t) / len(xs))
    return {b: float(np.median(v)) for b, v in times.items()}


# --- plots -----------------------------------------------------------------------------------------------

def pair_matrix(model: Any) -> np.ndarray | None:
    """|R| (F, F) with NaN where a pair is pruned (and on the diagonal); None for a model without pairs."""
    if model.interaction is None:
        return None
    R = model.interaction.matrix().detach().abs().numpy().astype(np.float64)
    R[R == 0] = np.nan
    return R


def dense_probs(model: Any, ids: np.ndarray) -> np.ndarray:
    """Click probabilities of a (dense) torch model on hashed ids, for the side-by-side calibration plot."""
    import torch

    with torch.no_grad():
        return np.concatenate([torch.sigmoid(model(torch.from_numpy(ids[s:s + 65_536]))).numpy()
                               for s in range(0, len(ids), 65_536)])


def write_plots(out: Path, labels: np.ndarray, probs: np.ndarray, model: Any, names: list[str],
                dense_model: Any = None, ids: np.ndarray | None = None) -> list[Path]:
    from deeplight.model import metrics as mx
    from deeplight.base.plots import plt  # sets the headless backend

    out.mkdir(parents=True, exist_ok=True)
    paths = []

    fpr, tpr = mx.roc_curve(labels, probs)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), 2000)).round().astype(int))
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr[keep], tpr[keep], label=f"AUC {mx.auc(labels, probs):.4f}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC curve")
    ax.legend(loc="lower right")
    paths.append(_save(fig, out / "roc_curve.png", plt))

    # Reliability diagram on log axes: CTRs crowd near zero, where a linear plot hides the low deciles.
    curves = [("pruned" if dense_model is not None else "model", probs)]
    if dense_model is not None and ids is not None:
        curves.insert(0, ("dense", dense_probs(dense_model, ids)))
    fig, ax = plt.subplots(figsize=(5, 5))
    low, high = 1.0, 1e-4
    for label, p in curves:
        mean_pred, observed, _ = mx.calibration_curve(labels, p, bins=10)
        ax.plot(mean_pred, np.maximum(observed, 1e-4), marker="o",
                label=f"{label}: ECE {mx.expected_calibration_error(labels, p):.4f}, "
                      f"mean {p.mean():.4f} vs {labels.mean():.4f}")
        low = min(low, float(mean_pred.min()), float(max(observed.min(), 1e-4)))
        high = max(high, float(mean_pred.max()), float(observed.max()))
    ax.plot([low, high], [low, high], ls="--", color="grey", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="mean predicted CTR (decile of rows)", ylabel="observed CTR",
           title="calibration (diagonal: calibrated)")
    ax.legend(loc="upper left", fontsize=7)
    paths.append(_save(fig, out / "calibration_curve.png", plt))

    R = pair_matrix(model) if model is not None else None
    if R is not None:
        panels = [("pruned" if dense_model is not None else "model", R)]
        if dense_model is not None and pair_matrix(dense_model) is not None:
            panels.insert(0, ("dense", pair_matrix(dense_model)))
        vmax = max(float(np.nanmax(m)) if np.isfinite(m).any() else 1.0 for _, m in panels)
        F = len(names)
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 1, 5.5), squeeze=False)
        for ax, (title, m) in zip(axes[0], panels):
            kept = int(np.isfinite(m).sum() // 2)
            im = ax.imshow(m, cmap="viridis", vmin=0, vmax=vmax)
            ax.set_title(f"{title}: |r_ij|, {kept} of {F * (F - 1) // 2} pairs kept")
            ax.set_xticks(range(F), names, rotation=90, fontsize=6)
            ax.set_yticks(range(F), names, fontsize=6)
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
        paths.append(_save(fig, out / "field_pairs.png", plt, tight=False))
    return paths


def _save(fig: Any, path: Path, plt: Any, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
