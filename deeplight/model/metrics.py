"""Click-model metrics in plain numpy: exact ROC AUC (ties by average rank), log loss, calibration, ECE.

    >>> from deeplight.model.metrics import auc, logloss, calibration, evaluate_arrays
    >>> auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    >>> auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5])
    0.5
    >>> round(logloss([1, 0], [0.8, 0.4]), 6)  # -(ln 0.8 + ln 0.6) / 2
    0.366985
    >>> calibration([0, 0, 0, 1], [0.5, 0.5, 0.5, 0.5])
    {'mean_pred': 0.5, 'observed_ctr': 0.25, 'ratio': 2.0}
    >>> round(expected_calibration_error([0, 0, 0, 1], [0.1, 0.1, 0.5, 0.5], bins=2), 6)  # (2*0.1 + 2*0)/4
    0.05
    >>> sorted(evaluate_arrays([0, 1], [0.2, 0.7]))
    ['auc', 'calibration', 'ece', 'logloss', 'mean_pred', 'observed_ctr', 'rows']
"""

from __future__ import annotations

from typing import Any

import numpy as np

from deeplight.base.errors import DeeplightError


def _binary_pair(labels: Any, values: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate and flatten (labels in {0, 1}, finite float64 values) of equal, non-zero length."""
    y = np.asarray(labels).reshape(-1)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if y.shape != v.shape:
        raise DeeplightError(f"metrics: {len(y)} labels but {len(v)} {what}")
    if y.size == 0:
        raise DeeplightError("metrics: no rows to evaluate")
    if not np.isin(y, (0, 1)).all():
        raise DeeplightError("metrics: labels must be 0 or 1")
    if not np.isfinite(v).all():
        raise DeeplightError(f"metrics: {what} contain NaN or infinity")
    return y.astype(np.int64), v


def _tie_groups(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positives, negatives) per distinct score, groups in descending score order."""
    order = np.argsort(-scores, kind="stable")
    s, ys = scores[order], y[order]
    starts = np.concatenate(([0], np.flatnonzero(np.diff(s)) + 1))
    pos = np.add.reduceat(ys, starts)
    neg = np.diff(np.append(starts, len(s))) - pos
    return pos, neg


def auc(labels: Any, scores: Any) -> float:
    """Exact ROC AUC, ties counted as half (= Mann-Whitney U with average ranks); O(n log n).

    DeeplightError when lengths differ or only one class is present.
    """
    y, s = _binary_pair(labels, scores, "scores")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise DeeplightError(f"metrics: AUC needs both classes; got {n_pos} positives and {n_neg} negatives")
    pos, neg = _tie_groups(y, s)
    # Each negative scores below every positive in earlier (higher-score) groups, half-wins for its own group.
    pos_above = np.cumsum(pos) - pos
    wins = (neg.astype(np.float64) * pos_above).sum() + 0.5 * (neg.astype(np.float64) * pos).sum()
    return float(wins / (float(n_pos) * float(n_neg)))


def roc_curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold from high to low, starting at (0, 0) and ending at (1, 1)."""
    y, s = _binary_pair(labels, scores, "scores")
    pos, neg = _tie_groups(y, s)
    if pos.sum() == 0 or neg.sum() == 0:
        raise DeeplightError("metrics: a ROC curve needs both classes")
    tpr = np.concatenate(([0.0], np.cumsum(pos) / pos.sum()))
    fpr = np.concatenate(([0.0], np.cumsum(neg) / neg.sum()))
    return fpr, tpr


def logloss(labels: Any, probs: Any, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy in nats; probabilities are clipped to [eps, 1 - eps] (in float64)."""
    y, p = _binary_pair(labels, probs, "probabilities")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(np.where(y == 1, np.log(p), np.log1p(-p))))


def calibration(labels: Any, probs: Any) -> dict[str, float]:
    """Mean predicted CTR, observed CTR and their ratio (1.0 = calibrated; NaN when no clicks observed)."""
    y, p = _binary_pair(labels, probs, "probabilities")
    mean_pred, observed = float(p.mean()), float(y.mean())
    ratio = mean_pred / observed if observed > 0 else float("nan")
    return {"mean_pred": mean_pred, "observed_ctr": observed, "ratio": ratio}


def calibration_curve(labels: Any, probs: Any, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reliability diagram on quantile bins: rows sorted by probability, cut into `bins` equal-count groups.

    Returns (mean predicted, observed CTR, rows) per bin, lowest probabilities first. Fewer bins come back
    when there are fewer rows than bins. Equal counts keep every bin's observed CTR equally noisy.
    """
    if bins < 1:
        raise DeeplightError(f"metrics: bins must be >= 1, got {bins}")
    y, p = _binary_pair(labels, probs, "probabilities")
    order = np.argsort(p, kind="stable")
    edges = np.unique(np.linspace(0, len(p), bins + 1).round().astype(np.int64))
    starts, counts = edges[:-1], np.diff(edges)
    mean_pred = np.add.reduceat(p[order], starts) / counts
    observed = np.add.reduceat(y[order].astype(np.float64), starts) / counts
    return mean_pred, observed, counts


def expected_calibration_error(labels: Any, probs: Any, bins: int = 10) -> float:
    """ECE: the row-weighted mean |mean predicted - observed CTR| over the reliability diagram's bins.

    The bins are `calibration_curve`'s equal-count (quantile) bins, not equal-width ones: click probabilities
    crowd below 0.3, where equal-width bins would put almost every row in one or two bins and hide the error.
    In CTR units (0.01 = predictions off by one percentage point on average); 0 = calibrated per bin.
    """
    mean_pred, observed, counts = calibration_curve(labels, probs, bins=bins)
    return float(np.sum(counts * np.abs(mean_pred - observed)) / np.sum(counts))


def evaluate_arrays(labels: Any, probs: Any) -> dict[str, float | int]:
    """The standard report: auc, logloss, rows, mean_pred, observed_ctr, calibration (= mean_pred / observed),
    ece (expected calibration error over 10 quantile bins)."""
    cal = calibration(labels, probs)
    return {
        "auc": auc(labels, probs),
        "logloss": logloss(labels, probs),
        "ece": expected_calibration_error(labels, probs),
        "rows": int(np.asarray(labels).size),
        "mean_pred": cal["mean_pred"],
        "observed_ctr": cal["observed_ctr"],
        "calibration": cal["ratio"],
    }
