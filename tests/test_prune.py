"""Pruning: the damped schedule, persistent masks, achieved sparsity, planted pairs kept, round trip, bad targets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deeplight.model import checkpoint
from deeplight.base.config import Config
from deeplight.base.errors import DeeplightError
from deeplight.model.deepfwfm import DeepFwFM
from deeplight.model.prune import (Pruner, Targets, damped_sparsity, fastest_first, fit_logit_scale, fold_logit_scale,
                                   prune, prune_as_configured, schedule, sparsity, valid_change, within_tolerance)
from deeplight.model.train import make_optimizer, train

from conftest import write_hashed_dataset

BASE = {"model.dnn": (64, 64), "train.batch_size": 256, "train.epochs": 2, "train.threads": 1}


def test_damped_schedule_follows_the_paper_and_reaches_the_target():
    assert damped_sparsity(0.9, 0, 100) == 0
    assert damped_sparsity(0.9, 100, 100) == pytest.approx(0.9 * 0.01)
    assert damped_sparsity(0.9, 45_820, 100) == pytest.approx(0.9 * 0.99, rel=1e-3)
    model = DeepFwFM([5] * 4, dnn=(8,))
    pruner = Pruner(model, Targets(dnn=0.8, field=0.5), ramp_steps=200)
    levels = [pruner.level(t)["dnn"] for t in range(0, 260, 10)]
    assert levels == sorted(levels) and levels[0] == 0
    assert pruner.level(199)["dnn"] == pytest.approx(0.8 * 0.99, rel=2e-3)
    assert pruner.level(200) == {"dnn": 0.8, "field": 0.5}


@pytest.mark.parametrize("optimizer", ["adam", "sparse_adam"])
@pytest.mark.parametrize("mode", ["unstructured", "structured"])
def test_masks_stay_exactly_zero_through_many_adam_steps(mode: str, optimizer: str):
    """Also with row-wise sparse updates of the embeddings (train.embedding_optimizer=sparse_adam): the masked
    sparse gradient and the zeroed moments keep a pruned entry at 0, L2 included."""
    torch.manual_seed(0)
    model = DeepFwFM([20] * 6, dnn=(32, 32))
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    else:
        tc = Config().replace(**{"train.embedding_optimizer": "sparse_adam", "train.weight_decay": 1e-2}).train
        opt = make_optimizer(model, tc, 1e-2)
    pruner = Pruner(model, Targets(dnn=0.7, field=0.6, embedding=0.5), mode=mode, ramp_steps=20, mask_every=5)
    pruner.attach(opt)
    for step in range(1, 301):
        ids = torch.randint(0, 20, (64, 6))
        loss = F.binary_cross_entropy_with_logits(model(ids), torch.randint(0, 2, (64,)).float())
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.after_step(model, step)
        if step >= 20 and step % 10 == 0:
            for name, p in pruner.params.items():
                assert (p[~pruner.masks[name]] == 0).all(), (name, step)
                assert (opt.state[p]["exp_avg"][~pruner.masks[name]] == 0).all(), (name, step)
    # Nothing pruned at the end of the ramp came back during the 280 steps after it.
    got = sparsity(model, mode)
    assert got["field"] == pytest.approx(0.6, abs=0.05)
    assert got["dnn"] == pytest.approx(0.7, abs=0.02)
    assert got["embedding"] == pytest.approx(0.5, abs=0.01)
    if mode == "structured":
        assert got["embedding_rows"] == pytest.approx(0.5, abs=0.01)
        assert got["dnn_weights"] > 0.7


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("prune")
    data = write_hashed_dataset(root / "hashed", rows=30_000, field_sizes=(40, 30, 20, 20, 10, 10, 8, 6),
                                planted=((0, 1), (2, 5), (3, 7)))
    train(data, root / "dense", Config().replace(**{**BASE, "train.epochs": 4}))
    return data, root / "dense" / "best.pt"


@pytest.mark.parametrize("mode,targets", [
    ("unstructured", {"prune.dnn": 0.9, "prune.field": 0.75, "prune.embedding": 0.4}),
    ("structured", {"prune.dnn": 0.75, "prune.field": 0.5, "prune.embedding": 0.3}),
])
def test_prune_reaches_targets_and_round_trips(dense, tmp_path: Path, mode: str, targets: dict):
    data, dense_ckpt = dense
    cfg = Config().replace(**BASE, **targets, **{"prune.mode": mode, "prune.ramp_epochs": 1.0,
                                                   "prune.finetune_epochs": 1})
    result = prune(dense_ckpt, data, tmp_path / "pruned", cfg)
    achieved = result["pruning"]["sparsity"]
    # Whole units make the achievable grid coarse: 28 pairs, 64 neurons per layer.
    assert achieved["dnn"] == pytest.approx(targets["prune.dnn"], abs=0.005 if mode == "unstructured" else 0.01)
    assert achieved["field"] == pytest.approx(targets["prune.field"], abs=1 / 28)
    assert achieved["embedding"] == pytest.approx(targets["prune.embedding"], abs=0.005)
    assert len(result["pruning"]["kept_pairs"]) == round(28 * (1 - targets["prune.field"]))
    assert result["valid"]["auc"] > result["dense_valid"]["auc"] - 0.03
    assert result["pruning"]["nonzero"]["total"] < result["pruning"]["params"]["total"]
    ck = checkpoint.load(tmp_path / "pruned" / "best.pt")
    reloaded = DeepFwFM.from_spec(ck["spec"])
    reloaded.load_state_dict(ck["model"])
    assert sparsity(reloaded, mode) == achieved
    ids = torch.randint(0, 6, (50, 8))
    model = DeepFwFM.from_spec(ck["spec"])
    model.load_state_dict(torch.load(tmp_path / "pruned" / "best.pt", weights_only=True)["model"])
    assert torch.equal(reloaded.eval()(ids), model.eval()(ids))


def test_pruning_r_keeps_the_planted_pairs(dense, tmp_path: Path):
    data, dense_ckpt = dense
    # Keep twice the number of planted pairs (6 of 28).
    # The dense model here had only four short epochs, so r still has to separate while pruning: this phase gets
    # the dense learning rate instead of the default tenth of it.
    cfg = Config().replace(**BASE, **{"prune.dnn": 0.0, "prune.embedding": 0.0, "prune.field": 1 - 6 / 28,
                                      "prune.ramp_epochs": 1.0, "prune.finetune_epochs": 1, "prune.lr": 1e-3})
    result = prune(dense_ckpt, data, tmp_path / "pairs", cfg)
    kept = {(p["i"], p["j"]) for p in result["pruning"]["kept_pairs"]}
    assert len(kept) == 6
    assert {(0, 1), (2, 5), (3, 7)} <= kept
    assert result["pruning"]["kept_pairs"][0]["pair"] in {"f0 x f1", "f2 x f5", "f3 x f7"}


def test_bad_targets_fail_clearly():
    with pytest.raises(DeeplightError, match="dnn=-0.1"):
        Targets(dnn=-0.1)
    with pytest.raises(DeeplightError, match=r"field=1\.0"):
        Targets(field=1.0)
    with pytest.raises(DeeplightError, match="unknown pruning component.*'bias'"):
        Targets.from_dict({"bias": 0.5})
    with pytest.raises(DeeplightError, match="unknown pruning mode"):
        Pruner(DeepFwFM([3, 3]), Targets(field=0.5), mode="random")
    with pytest.raises(DeeplightError, match="no DNN"):
        Pruner(DeepFwFM([3, 3], kind="fwfm"), Targets(dnn=0.5))


def test_schedule_is_counted_in_steps_with_a_minimum():
    p = Config().prune  # ramp 1 epoch, fine-tune 2 epochs, at least 100 steps each
    assert schedule(391, p) == (391, 3)  # large data: the epochs decide, as before
    assert schedule(4, p) == (100, 25 + 25)  # 8,000 rows at batch 2048: a 100-step ramp, not 4 steps
    assert schedule(32, p) == (100, 4 + 4)
    old = Config().replace(**{"prune.min_ramp_steps": 0, "prune.min_finetune_steps": 0}).prune
    assert schedule(4, old) == (4, 3)
    with pytest.raises(DeeplightError, match="ramp_epochs"):
        schedule(10, Config().replace(**{"prune.finetune_epochs": 0}).prune)


@pytest.mark.parametrize("kind", ["deepfwfm", "fwfm"])
def test_folded_logit_scale_is_exactly_a_times_logit_plus_b_and_keeps_zeros(kind: str):
    torch.manual_seed(1)
    model = DeepFwFM([7, 5, 4, 3], kind=kind, embed_dim=4, dnn=(8,)).eval()
    with torch.no_grad():
        model.bias.fill_(0.3)
        model.interaction.r[0] = 0.0
    ids = torch.randint(0, 3, (64, 4))
    before = model(ids).detach()
    fold_logit_scale(model, 0.5, -0.2)
    assert torch.allclose(model(ids).detach(), 0.5 * before - 0.2, atol=1e-6)
    assert model.interaction.r[0] == 0  # a pruned pair stays pruned


def test_fit_logit_scale_recovers_a_known_temperature():
    rng = torch.Generator().manual_seed(0)
    true_logit = torch.randn(40_000, generator=rng) - 1.0
    labels = (torch.rand(40_000, generator=rng) < torch.sigmoid(true_logit)).double()
    a, b = fit_logit_scale(2.0 * true_logit + 0.5, labels)  # overconfident and shifted: a ~ 0.5, b ~ -0.25 + ...
    assert a == pytest.approx(0.5, abs=0.03)
    assert b == pytest.approx(-0.25, abs=0.05)


def test_distillation_and_recalibration_are_recorded(dense, tmp_path: Path):
    data, dense_ckpt = dense
    cfg = Config().replace(**BASE, **{"prune.dnn": 0.8, "prune.field": 0.5, "prune.embedding": 0.3,
                                      "prune.ramp_epochs": 1.0, "prune.finetune_epochs": 1,
                                      "prune.distill_weight": 1.0, "prune.recalibrate": True})
    result = prune(dense_ckpt, data, tmp_path / "refit", cfg)
    refit = result["recalibrated"]
    assert refit["applied"] and refit["fitted_on"] == "valid"
    assert refit["valid_logloss_after"] <= refit["valid_logloss_before"] + 1e-9
    assert result["valid"]["logloss"] == pytest.approx(refit["valid_logloss_after"], abs=1e-5)
    assert result["pruning"]["distill_weight"] == 1.0
    ck = checkpoint.load(tmp_path / "refit" / "best.pt")
    assert ck["calibration"] == refit
    assert sparsity(checkpoint.load_model(tmp_path / "refit" / "best.pt")[0])["dnn"] == pytest.approx(0.8, abs=0.01)
    # Without the flag nothing is re-fitted, and the result says so.
    plain = prune(dense_ckpt, data, tmp_path / "plain", cfg.replace(**{"prune.recalibrate": False}))
    assert plain["recalibrated"] == {"applied": False}


def test_operating_point_search_tries_the_fastest_first_then_bisects(monkeypatch, tmp_path: Path):
    from deeplight.model import prune as prune_module

    points = ((0.95, 0.5, 0.1), (0.9, 0.5, 0.1), (0.8, 0.5, 0.1), (0.6, 0.5, 0.1))
    monkeypatch.setattr(prune_module, "OPERATING_POINTS", points)
    # Fake pruning runs and valid comparisons: AUC change per DNN target, standard error 0.002.
    auc_change = {0.95: -0.0005, 0.9: -0.0004, 0.8: 0.0, 0.6: 0.0}
    calls = []

    def fake(dense_checkpoint, data_dir, out_dir, cfg, tracker=None, run_name="prune"):
        calls.append(cfg.prune.dnn)
        assert cfg.prune.mode == "structured" and cfg.prune.auto is False
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "best.pt").write_text(str(cfg.prune.dnn))
        return {"checkpoint": str(Path(out_dir) / "best.pt"), "valid": {"auc": 0.75, "logloss": 0.45},
                "pruning": {"targets": {"dnn": cfg.prune.dnn}, "sparsity": {"dnn": cfg.prune.dnn}}}

    monkeypatch.setattr(prune_module, "prune", fake)
    monkeypatch.setattr(prune_module, "valid_logits", lambda path, data: (None, None))
    monkeypatch.setattr(prune_module, "valid_change", lambda labels, dense, pruned: {  # of the last run
        "auc": auc_change[calls[-1]], "auc_se": 0.002, "logloss": 0.0, "logloss_se": 0.001})
    cfg = Config()  # prune.auto is the default
    assert cfg.prune.auto and cfg.prune.max_auc_loss == 0.001
    # The fastest is within tolerance: one pruning run is the whole search.
    result = prune_as_configured(tmp_path / "dense.pt", tmp_path / "data", tmp_path / "one", cfg)
    assert calls == [0.95] and result["operating_point"]["chosen"] == "structured-0.95-0.5-0.1"
    assert (tmp_path / "one" / "best.pt").read_text() == "0.95"
    assert json.loads((tmp_path / "one" / "results.json").read_text())["operating_point"]["tried"][0][
        "valid_change"]["auc_se"] == 0.002
    # The fastest two lose too much: 0.95 first, then a bisection over the rest, three runs at most.
    auc_change.update({0.95: -0.01, 0.9: -0.005})
    calls.clear()
    result = prune_as_configured(tmp_path / "dense.pt", tmp_path / "data", tmp_path / "two", cfg)
    assert calls == [0.95, 0.8, 0.9] and result["operating_point"]["chosen"] == "structured-0.8-0.5-0.1"
    assert result["operating_point"]["within_tolerance"] is True
    assert [t["within_tolerance"] for t in result["operating_point"]["tried"]] == [False, False, True]  # by speed
    # Widened by 3 paired standard errors (0.001 + 3 x 0.002), the -0.005 of 0.9 is noise: it is chosen.
    calls.clear()
    result = prune_as_configured(tmp_path / "dense.pt", tmp_path / "data", tmp_path / "se", cfg.replace(
        **{"prune.tolerance_se": 3.0}))
    assert result["operating_point"]["chosen"] == "structured-0.9-0.5-0.1"
    # Nothing within tolerance: the mildest setting is kept and flagged.
    auc_change.update({0.8: -0.01, 0.6: -0.01})
    result = prune_as_configured(tmp_path / "dense.pt", tmp_path / "data", tmp_path / "none", cfg)
    assert result["operating_point"]["chosen"] == "structured-0.6-0.5-0.1"
    assert result["operating_point"]["within_tolerance"] is False
    # prune.auto=false prunes to the targets as given.
    calls.clear()
    prune_as_configured(tmp_path / "dense.pt", tmp_path / "data", tmp_path / "fixed", cfg.replace(
        **{"prune.auto": False, "prune.mode": "structured", "prune.dnn": 0.7}))
    assert calls == [0.7]


def test_fastest_first_search_order():
    for n in (1, 2, 3, 4, 5, 8):
        for first_ok in range(n + 1):  # settings first_ok.. pass (n: none does)
            tried = []
            index, found = fastest_first(n, lambda i: tried.append(i) or i >= first_ok)
            assert (index, found) == ((first_ok, True) if first_ok < n else (n - 1, False)), (n, first_ok)
            assert tried[0] == 0 and len(tried) == len(set(tried))
            assert len(tried) <= 1 + math.ceil(math.log2(n)), (n, first_ok, tried)


def test_valid_change_and_tolerance():
    rng = np.random.default_rng(0)
    labels = (rng.random(4000) < 0.25).astype(np.float32)
    dense = rng.normal(size=4000) + 1.5 * labels
    same = valid_change(labels, dense, dense)
    assert same["auc"] == 0 and same["auc_se"] == 0 and same["logloss"] == 0 and same["logloss_se"] == 0
    noisy = valid_change(labels, dense, dense + rng.normal(scale=1.0, size=4000))
    assert noisy["auc"] < -0.02 and 0 < noisy["auc_se"] < 0.02 and noisy["logloss"] > 0
    p = Config().prune
    assert within_tolerance({"auc": -0.0009, "auc_se": 0.01, "logloss": 0.0019, "logloss_se": 0.0}, p)
    assert not within_tolerance({"auc": -0.0011, "auc_se": 0.01, "logloss": 0.0, "logloss_se": 0.0}, p)
    # Logloss counts too: an AUC within tolerance with worse probabilities is not accepted.
    assert not within_tolerance({"auc": 0.0, "auc_se": 0.0, "logloss": 0.003, "logloss_se": 0.01}, p)
    wide = Config().replace(**{"prune.tolerance_se": 1.0}).prune
    assert within_tolerance({"auc": -0.0011, "auc_se": 0.01, "logloss": 0.003, "logloss_se": 0.01}, wide)


def test_operating_point_on_a_real_model(dense, tmp_path: Path, monkeypatch):
    from deeplight.model import prune as prune_module

    monkeypatch.setattr(prune_module, "OPERATING_POINTS", ((0.9, 0.9, 0.5), (0.5, 0.5, 0.2)))
    data, dense_ckpt = dense
    cfg = Config().replace(**BASE, **{"prune.max_auc_loss": 1.0, "prune.max_logloss_gain": 1.0,
                                      "prune.finetune_epochs": 1})
    result = prune_as_configured(dense_ckpt, data, tmp_path / "auto", cfg)
    assert result["operating_point"]["chosen"] == "structured-0.9-0.9-0.5"
    assert [t["setting"] for t in result["operating_point"]["tried"]] == ["structured-0.9-0.9-0.5"]
    change = result["operating_point"]["tried"][0]["valid_change"]
    # The comparison is made on the valid split from both checkpoints: it matches the recorded valid metrics.
    assert change["auc"] == pytest.approx(result["valid"]["auc"] - result["dense_valid"]["auc"], abs=1e-6)
    assert change["auc_se"] > 0 and change["logloss_se"] > 0
    ck = checkpoint.load(tmp_path / "auto" / "best.pt")
    assert json.loads(ck["config"])["prune"]["mode"] == "structured"
    assert json.loads((tmp_path / "auto" / "results.json").read_text())["operating_point"]["tried"]
    assert sparsity(checkpoint.load_model(tmp_path / "auto" / "best.pt")[0], "structured")["dnn"] == \
        pytest.approx(0.9, abs=0.02)
