"""Metrics against sklearn (a test-only dependency) and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from deeplight.base.errors import DeeplightError
from deeplight.model.metrics import (auc, calibration, calibration_curve, evaluate_arrays, expected_calibration_error,
                                     logloss, roc_curve)


def test_auc_by_hand():
    # positives .35 and .8 against negatives .1 and .4: .35 beats only .1, .8 beats both -> 3 of 4 pairs.
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert auc([1, 0, 1, 0, 1], [3, 3, 3, 3, 3]) == 0.5  # all tied
    assert auc([0, 1], [0.2, 0.9]) == 1.0
    assert auc([0, 1], [0.9, 0.2]) == 0.0
    # positives {2, 1}, negatives {1, 0}: 2>1, 2>0, 1>0 win, the 1=1 tie counts half -> 3.5 / 4 pairs.
    assert auc([1, 1, 0, 0], [2, 1, 1, 0]) == 0.875


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_sklearn_with_many_ties(seed: int):
    rng = np.random.default_rng(seed)
    n = 20_000
    y = rng.integers(0, 2, n)
    scores = np.round(0.3 * y + rng.random(n), 1)  # ~14 distinct values: nearly every row ties
    assert len(np.unique(scores)) < 20
    assert auc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    s32 = rng.random(n).astype(np.float32)  # float32 probabilities as a model emits them
    assert auc(y, s32) == pytest.approx(roc_auc_score(y, s32), abs=1e-12)


def test_auc_is_rank_based_and_symmetric():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    s = rng.normal(size=500) + y
    a = auc(y, s)
    assert auc(y, np.exp(s)) == pytest.approx(a)  # monotone transform
    assert auc(1 - y, s) == pytest.approx(1 - a)  # swapping classes


def test_auc_errors():
    with pytest.raises(DeeplightError, match="both classes"):
        auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(DeeplightError, match="both classes"):
        auc([0, 0], [0.1, 0.2])
    with pytest.raises(DeeplightError, match="3 labels but 2"):
        auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(DeeplightError, match="0 or 1"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(DeeplightError, match="NaN"):
        auc([0, 1], [0.1, float("nan")])
    with pytest.raises(DeeplightError, match="no rows"):
        auc([], [])


def test_roc_curve_matches_sklearn_and_integrates_to_auc():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 3_000)
    s = np.round(rng.random(3_000) + 0.5 * y, 2)
    fpr, tpr = roc_curve(y, s)
    sk_fpr, sk_tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    # Trapezoids under the curve give AUC with ties counted half: an independent check of auc().
    assert np.trapezoid(tpr, fpr) == pytest.approx(auc(y, s), abs=1e-12)


def test_logloss_by_hand_and_vs_sklearn():
    assert logloss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2, rel=1e-12)
    assert logloss([1], [0.5]) == pytest.approx(math.log(2), rel=1e-12)
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 10_000)
    p = rng.uniform(0.01, 0.99, 10_000)
    assert logloss(y, p) == pytest.approx(log_loss(y, p), rel=1e-10)
    # Clipping keeps a confident wrong prediction finite: -ln(eps), computed in float64 even for float32 input.
    assert logloss([1], np.array([0.0], dtype=np.float32), eps=1e-7) == pytest.approx(-math.log(1e-7), rel=1e-9)
    assert logloss([0], np.array([1.0], dtype=np.float32), eps=1e-7) == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_calibration_known_case():
    cal = calibration([0, 0, 0, 1, 1], [0.2, 0.2, 0.2, 0.2, 0.2])
    assert cal["mean_pred"] == pytest.approx(0.2)
    assert cal["observed_ctr"] == pytest.approx(0.4)
    assert cal["ratio"] == pytest.approx(0.5)  # under-predicts by half
    assert math.isnan(calibration([0, 0], [0.1, 0.3])["ratio"])  # no clicks: ratio undefined


def test_calibration_curve_quantile_bins():
    p = np.arange(1, 101) / 100.0  # 0.01 .. 1.00, shuffled below
    y = (np.arange(100) % 4 == 0).astype(int)  # 25% clicks, evenly spread over probabilities
    order = np.random.default_rng(6).permutation(100)
    mean_pred, observed, counts = calibration_curve(y[order], p[order], bins=4)
    np.testing.assert_array_equal(counts, [25, 25, 25, 25])
    np.testing.assert_allclose(mean_pred, [0.13, 0.38, 0.63, 0.88])  # means of 0.01..0.25, 0.26..0.50, ...
    np.testing.assert_allclose(observed, [7 / 25, 6 / 25, 6 / 25, 6 / 25])  # clicks at p = .01, .05, .09, ...
    # Fewer rows than bins: one row per bin, nothing empty.
    m, o, c = calibration_curve([1, 0, 1], [0.9, 0.1, 0.5], bins=10)
    np.testing.assert_array_equal(c, [1, 1, 1])
    np.testing.assert_allclose(m, [0.1, 0.5, 0.9])
    np.testing.assert_allclose(o, [0, 1, 1])


def test_expected_calibration_error_by_hand():
    # Two quantile bins: the low half predicts 0.1 and sees 1 click in 4 (|0.1 - 0.25|), the high half is exact.
    y = [0, 0, 0, 1, 1, 1, 0, 0]
    p = [0.1, 0.1, 0.1, 0.1, 0.5, 0.5, 0.5, 0.5]
    assert expected_calibration_error(y, p, bins=2) == pytest.approx(0.5 * 0.15)
    # A constant shift of every prediction is an ECE of that shift, whatever the bins.
    rng = np.random.default_rng(3)
    q = rng.uniform(0.1, 0.5, 20_000)
    clicks = (rng.random(20_000) < q).astype(int)
    assert expected_calibration_error(clicks, q + 0.05) == pytest.approx(0.05, abs=0.01)
    assert expected_calibration_error(clicks, q) < 0.01
    with pytest.raises(DeeplightError, match="bins"):
        expected_calibration_error(y, p, bins=0)


def test_evaluate_arrays():
    rng = np.random.default_rng(7)
    p = rng.uniform(0.05, 0.95, 5_000)
    y = (rng.random(5_000) < p).astype(int)  # calibrated by construction
    out = evaluate_arrays(y, p)
    assert set(out) == {"auc", "logloss", "ece", "rows", "mean_pred", "observed_ctr", "calibration"}
    assert out["rows"] == 5_000
    assert out["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert out["logloss"] == pytest.approx(log_loss(y, p), rel=1e-10)
    assert out["observed_ctr"] == pytest.approx(y.mean())
    assert abs(out["calibration"] - 1.0) < 0.05
    assert out["ece"] < 0.03  # calibrated: only sampling noise per bin (500 rows, sd ~0.02)
    assert all(isinstance(v, (int, float)) for v in out.values())
