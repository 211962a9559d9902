"""DeepLight pruning: gradual magnitude pruning of the DNN, the field-pair matrix R and the embeddings.

    from deeplight.model.prune import prune, prune_as_configured
    result = prune("out/dense/best.pt", "data/hashed", "out/pruned", Config())  # targets from cfg.prune
    result["pruning"]["sparsity"], result["pruning"]["kept_pairs"][:5]
    auto = prune_as_configured("out/dense/best.pt", "data/hashed", "out/auto", Config())  # prune.auto: searched
    auto["operating_point"]["chosen"], auto["operating_point"]["tried"]

Starting from a trained dense checkpoint, training continues while the sparsity of each component ramps up
with the damped schedule of the paper, S_t = S * (1 - 0.99^(t/d)), t = steps since pruning began, then the
masks stay fixed for fine-tuning. The paper uses d = 100 on 45M-row Criteo (the ramp reaches 99% of S after
~46k steps); d = ramp_steps / 458.2 makes our ramp reach 99% of S at its end, where the exact target is imposed.
Best-epoch selection (valid AUC) starts only once the target is reached.

Schedules are counted in optimiser steps (`schedule`): the ramp lasts max(ramp_epochs x steps per epoch,
prune.min_ramp_steps = 100) steps, the fine-tuning max(finetune_epochs, enough epochs for
prune.min_finetune_steps = 100) epochs. On large data the epochs decide (1M rows at batch 2048: 391 steps per
epoch, nothing changes); on an 8,000-row sample (32 steps per epoch at the batch `train.min_steps_per_epoch`
gives, see `train.train_batch_size`) the ramp takes 100 steps over 4 epochs with 10 mask updates instead of
4 steps and one update, and fine-tuning 4 epochs. 100 steps at the pruning lr 1e-4 is about a tenth of the
movement of dense training to its best epoch on such a sample, enough to recover without overfitting it.

Distillation (prune.distill_weight > 0): the loss is the label BCE plus distill_weight x BCE toward the dense
model's probabilities on the same batch (the teacher runs without dropout), during the ramp and fine-tuning.
Recalibration (prune.recalibrate): after the best epoch is chosen, a temperature and bias of the final logit
are fitted on the valid split and folded into the weights (`fold_logit_scale`); the result, the checkpoint
(`calibration`) and MLflow say so.

Components and modes:
- `dnn`: unstructured = per-layer magnitude threshold on every hidden layer's weights (not the 1-wide output
  layer); structured = whole hidden neurons (row of W_k, bias_k, column of W_k+1) by L2 norm, per layer; the
  target is then the share of neurons removed.
- `field`: whole field pairs by |r_ij| (R is symmetric by construction: a pair is kept or dropped as a whole).
- `embedding`: unstructured = one global magnitude threshold over all table entries; structured = whole rows
  (features) by L2 norm.

Masks are persistent: gradients are masked, Adam's moments of pruned entries are zeroed when a mask changes, and
weights are re-zeroed, so a pruned weight stays exactly zero for the rest of training (the original code let Adam
regrow them between prunes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from deeplight.model import checkpoint
from deeplight.base.config import MODEL_SECTIONS, Config, PruneConfig
from deeplight.data.loader import SplitLoader, check_both_classes, read_manifest
from deeplight.base.errors import DeeplightError
from deeplight.base.files import write_json
from deeplight.model.deepfwfm import DeepFwFM
from deeplight.model.device import resolve as resolve_device
from deeplight.base.tracker import NullTracker, RunLog, Tracker
from deeplight.model import metrics
from deeplight.model.train import EVAL_BATCH, Trainer, evaluate_split, predict_logits, train_batch_size

COMPONENTS = ("dnn", "field", "embedding")
MODES = ("unstructured", "structured")
# 0.99^(t/d) = 0.01  <=>  t = d * ln(0.01) / ln(0.99) = 458.2 d
_STEPS_TO_99_PERCENT = math.log(0.01) / math.log(0.99)


@dataclass(frozen=True)
class Targets:
    """Target sparsity per component, each in [0, 1)."""

    dnn: float = 0.0
    field: float = 0.0
    embedding: float = 0.0

    def __post_init__(self) -> None:
        for name in COMPONENTS:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0 or math.isnan(value):
                raise DeeplightError(f"pruning target {name}={value!r} must be a fraction in [0, 1)")

    @classmethod
    def from_dict(cls, d: dict[str, float]) -> "Targets":
        unknown = set(d) - set(COMPONENTS)
        if unknown:
            raise DeeplightError(f"unknown pruning component(s) {sorted(unknown)}; known: {', '.join(COMPONENTS)}")
        return cls(**d)

    @classmethod
    def from_config(cls, p: PruneConfig) -> "Targets":
        return cls(dnn=p.dnn, field=p.field, embedding=p.embedding)


def damped_sparsity(target: float, t: int, damping: float) -> float:
    """The paper's schedule S_t = S * (1 - 0.99^(t / damping))."""
    return target * (1.0 - 0.99 ** (t / damping))


def _keep_top(scores: torch.Tensor, alive: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask of the `keep` highest scores among `alive` entries (pruned ones never come back)."""
    keep = max(0, min(keep, int(alive.sum())))
    s = torch.where(alive, scores, torch.full_like(scores, -1.0))
    mask = torch.zeros_like(alive)
    if keep:
        mask.view(-1)[torch.topk(s.reshape(-1), keep, sorted=False).indices] = True
    return mask


class Pruner:
    """Training hook (see `deeplight.model.train.TrainHooks`) that owns the masks and applies the schedule."""

    def __init__(self, model: DeepFwFM, targets: Targets, mode: str = "unstructured", ramp_steps: int = 1000,
                 mask_every: int = 10):
        if mode not in MODES:
            raise DeeplightError(f"unknown pruning mode {mode!r}; choose one of {', '.join(MODES)}")
        if ramp_steps < 1 or mask_every < 1:
            raise DeeplightError("pruning ramp_steps and mask_every must be >= 1")
        if targets.dnn and model.dnn is None:
            raise DeeplightError(f"a {model.spec['kind']} model has no DNN to prune (dnn target {targets.dnn})")
        if targets.field and (model.interaction is None or not model.interaction.learnable):
            raise DeeplightError(f"a {model.spec['kind']} model has no field-pair weights to prune")
        if targets.embedding and model.embedding is None:
            raise DeeplightError(f"a {model.spec['kind']} model has no embeddings to prune")
        self.model, self.targets, self.mode = model, targets, mode
        self.ramp_steps, self.mask_every = ramp_steps, mask_every
        self.damping = ramp_steps / _STEPS_TO_99_PERCENT
        self.optimizer: torch.optim.Optimizer | None = None
        self.step = 0
        self.params = self._prunable()
        self.masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in self.params.items()}
        for name, p in self.params.items():
            p.register_hook(lambda g, name=name: g * self.masks[name])

    def _prunable(self) -> dict[str, torch.nn.Parameter]:
        m, out = self.model, {}
        if self.targets.dnn:
            for k, layer in enumerate(m.dnn.layers[:-1]):
                out[f"dnn.layers.{k}.weight"] = layer.weight
                if self.mode == "structured":
                    out[f"dnn.layers.{k}.bias"] = layer.bias
                    out[f"dnn.layers.{k + 1}.weight"] = m.dnn.layers[k + 1].weight
        if self.targets.field:
            out["interaction.r"] = m.interaction.r
        if self.targets.embedding:
            out["embedding.table.weight"] = m.embedding.table.weight
        return out

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    # -- schedule ------------------------------------------------------------------------------------------
    def level(self, t: int) -> dict[str, float]:
        """Sparsity per component at step t of pruning (exact targets from the end of the ramp on)."""
        done = t >= self.ramp_steps
        return {c: (getattr(self.targets, c) if done else damped_sparsity(getattr(self.targets, c), t, self.damping))
                for c in COMPONENTS if getattr(self.targets, c)}

    def after_step(self, model: DeepFwFM, step: int) -> None:
        self.step = step
        if step <= self.ramp_steps and (step % self.mask_every == 0 or step == self.ramp_steps):
            self.update(self.level(step))

    def selectable(self) -> bool:
        return self.step >= self.ramp_steps

    # -- masks ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, level: dict[str, float]) -> None:
        """Recompute masks for the given sparsity per component, then zero weights and optimizer state."""
        m = self.model
        if "dnn" in level:
            for k, layer in enumerate(m.dnn.layers[:-1]):
                if self.mode == "unstructured":
                    name = f"dnn.layers.{k}.weight"
                    keep = round((1 - level["dnn"]) * layer.weight.numel())
                    self.masks[name] = _keep_top(layer.weight.abs(), self.masks[name], keep)
                else:
                    self._prune_neurons(k, level["dnn"])
        if "field" in level:
            r = m.interaction.r
            keep = round((1 - level["field"]) * r.numel())
            self.masks["interaction.r"] = _keep_top(r.abs(), self.masks["interaction.r"], keep)
            m.interaction.pair_mask.copy_(self.masks["interaction.r"].float())
        if "embedding" in level:
            table = m.embedding.table.weight
            name = "embedding.table.weight"
            if self.mode == "unstructured":
                keep = round((1 - level["embedding"]) * table.numel())
                self.masks[name] = _keep_top(table.abs(), self.masks[name], keep)
            else:
                rows_alive = self.masks[name].all(1)
                keep = round((1 - level["embedding"]) * table.shape[0])
                rows = _keep_top(table.norm(dim=1), rows_alive, keep)
                self.masks[name] = rows[:, None].expand_as(table).clone()
        self.apply()

    def _prune_neurons(self, k: int, sparsity: float) -> None:
        layer, nxt = self.model.dnn.layers[k], self.model.dnn.layers[k + 1]
        w_name, b_name, n_name = f"dnn.layers.{k}.weight", f"dnn.layers.{k}.bias", f"dnn.layers.{k + 1}.weight"
        alive = self.masks[w_name].any(1) & self.masks[b_name]
        score = torch.cat([layer.weight, layer.bias[:, None]], 1).norm(dim=1) * nxt.weight.norm(dim=0)
        neurons = _keep_top(score, alive, round((1 - sparsity) * layer.out_features))
        self.masks[w_name] = self.masks[w_name] & neurons[:, None]
        self.masks[b_name] = self.masks[b_name] & neurons
        self.masks[n_name] = self.masks[n_name] & neurons[None, :]

    @torch.no_grad()
    def apply(self) -> None:
        """Zero pruned weights and their Adam moments so nothing regrows them."""
        for name, p in self.params.items():
            mask = self.masks[name]
            p.mul_(mask)
            state = self.optimizer.state.get(p, {}) if self.optimizer is not None else {}
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in state:
                    state[key].mul_(mask)

    # -- checkpoint state ----------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"masks": {k: v.clone() for k, v in self.masks.items()}, "step": self.step}

    def load_state(self, state: dict[str, Any]) -> None:
        self.masks = {k: v.clone() for k, v in state["masks"].items()}
        self.step = state["step"]
        if "interaction.r" in self.masks:
            self.model.interaction.pair_mask.copy_(self.masks["interaction.r"].float())
        self.apply()

    # -- reporting -----------------------------------------------------------------------------------------
    def epoch_metrics(self, model: DeepFwFM) -> dict[str, float]:
        return {f"sparsity_{k}": v for k, v in sparsity(model, self.mode).items()}


def sparsity(model: DeepFwFM, mode: str = "unstructured") -> dict[str, float]:
    """Achieved sparsity per component, measured on the weights themselves (exact zeros)."""
    out: dict[str, float] = {}
    if model.dnn is not None:
        hidden = [layer.weight for layer in model.dnn.layers[:-1]]
        out["dnn_weights"] = float(sum(int((w == 0).sum()) for w in hidden) / sum(w.numel() for w in hidden))
        dead = sum(int(((layer.weight == 0).all(1) & (layer.bias == 0)).sum()) for layer in model.dnn.layers[:-1])
        out["dnn_neurons"] = dead / sum(layer.out_features for layer in model.dnn.layers[:-1])
        out["dnn"] = out["dnn_neurons"] if mode == "structured" else out["dnn_weights"]
    if model.interaction is not None and model.interaction.learnable:
        out["field"] = float((model.interaction.weights() == 0).float().mean())
    if model.embedding is not None:
        table = model.embedding.table.weight
        out["embedding"] = float((table == 0).float().mean())
        out["embedding_rows"] = float((table == 0).all(1).float().mean())
    return out


def nonzero_counts(model: DeepFwFM) -> dict[str, int]:
    counts = {}
    for part in ("embedding", "interaction", "linear", "dnn"):
        module = getattr(model, part)
        if module is not None:
            counts[part] = int(sum((p != 0).sum() for p in module.parameters()))
    counts["total"] = sum(counts.values()) + int(model.bias != 0)
    return counts


def kept_pairs(model: DeepFwFM, field_names: list[str]) -> list[dict[str, Any]]:
    """Field pairs with a nonzero weight, strongest first: the informative interactions."""
    if model.interaction is None:
        return []
    w = model.interaction.weights().detach()
    order = torch.argsort(w.abs(), descending=True).tolist()
    pairs = model.interaction.pairs
    return [{"pair": f"{field_names[pairs[k][0]]} x {field_names[pairs[k][1]]}", "i": pairs[k][0],
             "j": pairs[k][1], "r": float(w[k])} for k in order if w[k] != 0]


def report(model: DeepFwFM, field_names: list[str], targets: Targets, mode: str) -> dict[str, Any]:
    return {"targets": asdict(targets), "mode": mode, "sparsity": sparsity(model, mode),
            "nonzero": nonzero_counts(model), "params": model.param_counts(),
            "kept_pairs": kept_pairs(model, field_names)}


def schedule(steps_per_epoch: int, p: PruneConfig) -> tuple[int, int]:
    """(ramp steps, epochs in all) of a pruning run with `steps_per_epoch` optimiser steps per epoch."""
    if p.finetune_epochs < 1 or p.ramp_epochs <= 0:
        raise DeeplightError("pruning needs ramp_epochs > 0 and finetune_epochs >= 1")
    steps_per_epoch = max(1, steps_per_epoch)
    ramp_steps = max(1, p.min_ramp_steps, round(p.ramp_epochs * steps_per_epoch))
    finetune_epochs = max(p.finetune_epochs, math.ceil(p.min_finetune_steps / steps_per_epoch))
    return ramp_steps, math.ceil(ramp_steps / steps_per_epoch) + finetune_epochs


# -- recalibration ----------------------------------------------------------------------------------------

def fit_logit_scale(logits: Any, labels: Any, scale: bool = True) -> tuple[float, float]:
    """(a, b) minimising the logloss of sigmoid(a * logit + b) on the given rows (Platt scaling; a = 1/T)."""
    z = torch.as_tensor(logits, dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(labels, dtype=torch.float64).reshape(-1)
    a = torch.ones((), dtype=torch.float64, requires_grad=scale)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([a, b] if scale else [b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(a * z + b, y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(a.detach()), float(b.detach())


def can_scale_logit(model: DeepFwFM) -> bool:
    """Whether every term of the logit is linear in a parameter (a plain FM's r is fixed at 1: it is not)."""
    return model.interaction is None or model.interaction.learnable


@torch.no_grad()
def fold_logit_scale(model: DeepFwFM, a: float, b: float) -> None:
    """Make the model's logit a * logit + b by scaling the last linear parameter of each term (zeros stay zero)."""
    if a != 1.0 and not can_scale_logit(model):
        raise DeeplightError(f"a {model.spec['kind']} model's logit cannot be scaled (fixed interaction)")
    tensors = [model.bias, model.linear.w.weight]
    if model.linear.v is not None:
        tensors.append(model.linear.v if isinstance(model.linear.v, torch.nn.Parameter) else model.linear.v.weight)
    if model.interaction is not None and model.interaction.learnable:
        tensors.append(model.interaction.r)
    if model.dnn is not None:
        tensors += [model.dnn.layers[-1].weight, model.dnn.layers[-1].bias]
    for t in tensors:
        t.mul_(a)
    model.bias.add_(b)


def recalibrate(model: DeepFwFM, data_dir: str | Path, best_path: Path) -> dict[str, Any]:
    """Fit and fold a temperature and bias on the valid split into `model` and its checkpoint `best_path`;
    the record of what was done (`calibration` in the checkpoint). Done once: a refitted checkpoint is kept."""
    ck = checkpoint.load(best_path)
    if ck.get("calibration"):
        return ck["calibration"]
    labels, logits = predict_logits(model, SplitLoader(data_dir, "valid", batch_size=EVAL_BATCH))
    a, b = fit_logit_scale(logits, labels, scale=can_scale_logit(model))
    before = metrics.logloss(labels, torch.sigmoid(torch.from_numpy(logits)).numpy())
    fold_logit_scale(model, a, b)
    after = metrics.logloss(labels, torch.sigmoid(torch.from_numpy(a * logits + b)).numpy())
    record = {"applied": True, "fitted_on": "valid", "logit_scale": a, "logit_shift": b, "temperature": 1 / a,
              "valid_logloss_before": before, "valid_logloss_after": after}
    ck.update(model=model.state_dict(), calibration=record, valid=evaluate_split(model, data_dir, "valid"))
    checkpoint.save(ck, best_path)
    return record


def config_of(dense_checkpoint: str | Path) -> Config:
    """The config a checkpoint was trained with: pruning continues with the same model and optimiser settings."""
    return Config.from_dict(json.loads(checkpoint.load_checkpoint(dense_checkpoint)["config"]))


def config_for_pruning(dense_checkpoint: str | Path) -> Config:
    """What `deeplight prune` and a sweep over a given dense checkpoint start from: the checkpoint's data,
    features, model and train sections (what the model is and how training continues) and today's defaults for
    everything else. How to prune is the pruning step's to say (its flags and --set), not whatever prune
    settings the checkpoint carried from when it was trained: a checkpoint from before a default changed would
    otherwise prune with the old one (lr 1e-4, no search) without saying so."""
    trained = config_of(dense_checkpoint)
    return dataclasses.replace(Config(), data=trained.data, features=trained.features, model=trained.model,
                               train=trained.train)


def prune_as_configured(dense_checkpoint: str | Path, data_dir: str | Path, out_dir: str | Path, cfg: Config,
                        tracker: Tracker | None = None, run_name: str = "prune") -> dict[str, Any]:
    """What `deeplight prune` and the pipeline's prune step run: the operating point search
    (`choose_operating_point`) when cfg.prune.auto (the default), else `prune` to cfg.prune's targets."""
    if cfg.prune.auto:
        return choose_operating_point(dense_checkpoint, data_dir, out_dir, cfg, tracker, run_name)
    return prune(dense_checkpoint, data_dir, out_dir, cfg, tracker, run_name)


# Structured settings from fastest to slowest: (share of DNN neurons removed per layer, of field pairs, of
# embedding rows); no component's share grows down the list, so quality should not fall along it. Whole
# neurons are what the engine turns into batch-1 speed (95% of them alone: 23-32x on the real samples); field
# pairs buy a little (95% alone: 1.3-4x) and embedding rows nothing at batch 1, while removing rows cost the
# most valid AUC on Avazu (60% of rows: -0.009), so embeddings are pruned little or not at all
# (bench/RESULTS.md, issue 17: per component).
OPERATING_POINTS = ((0.95, 0.9, 0.2), (0.95, 0.5, 0.0), (0.9, 0.5, 0.0), (0.8, 0.3, 0.0))


def setting_label(point: tuple[float, float, float]) -> str:
    dnn, field, embedding = point
    return f"structured-{dnn:g}-{field:g}-{embedding:g}"


def fastest_first(n: int, passes: Callable[[int], bool]) -> tuple[int, bool]:
    """(index, found): the first i in range(n) with passes(i), assuming quality grows with i. The fastest (0)
    is tried first, since where it keeps quality one pruning run is the whole search; then a bisection over
    the rest. At most 1 + ceil(log2(n)) calls (3 for 4 settings). None passes: (n - 1, False).

    >>> fastest_first(4, lambda i: i >= 2)
    (2, True)
    """
    seen: dict[int, bool] = {}

    def ok(i: int) -> bool:
        if i not in seen:
            seen[i] = passes(i)
        return seen[i]

    if ok(0):
        return 0, True
    lo, hi = min(1, n - 1), n - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo, ok(lo)


def valid_change(labels: np.ndarray, dense_logits: np.ndarray, logits: np.ndarray, rounds: int = 200,
                 seed: int = 0) -> dict[str, float]:
    """Pruned minus dense on the same valid rows: AUC and logloss changes with their paired standard errors
    (AUC: bootstrap, both models scored on each resample; logloss: per-row loss differences)."""
    probs, dense_probs = 1 / (1 + np.exp(-logits)), 1 / (1 + np.exp(-dense_logits))
    rng, n, diffs = np.random.default_rng(seed), len(labels), []
    for _ in range(rounds):
        rows = rng.integers(0, n, n)
        if labels[rows].min() != labels[rows].max():
            diffs.append(metrics.auc(labels[rows], logits[rows]) - metrics.auc(labels[rows], dense_logits[rows]))
    row_loss = lambda z: np.logaddexp(0.0, z) - labels * z  # noqa: E731  (per-row BCE of a logit)
    loss_diff = row_loss(logits.astype(np.float64)) - row_loss(dense_logits.astype(np.float64))
    return {"auc": metrics.auc(labels, logits) - metrics.auc(labels, dense_logits),
            "auc_se": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else 0.0,
            "logloss": metrics.logloss(labels, probs) - metrics.logloss(labels, dense_probs),
            "logloss_se": float(np.std(loss_diff, ddof=1) / math.sqrt(n)) if n > 1 else 0.0}


def within_tolerance(change: dict[str, float], p: PruneConfig) -> bool:
    """AUC lost at most max_auc_loss and logloss gained at most max_logloss_gain, each plus tolerance_se
    standard errors of the paired difference."""
    return (change["auc"] >= -(p.max_auc_loss + p.tolerance_se * change["auc_se"])
            and change["logloss"] <= p.max_logloss_gain + p.tolerance_se * change["logloss_se"])


def valid_logits(checkpoint_path: str | Path, data_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(labels, logits) of a checkpoint's model on the valid split."""
    return predict_logits(checkpoint.load_model(checkpoint_path)[0],
                          SplitLoader(data_dir, "valid", batch_size=EVAL_BATCH))


def choose_operating_point(dense_checkpoint: str | Path, data_dir: str | Path, out_dir: str | Path, cfg: Config,
                           tracker: Tracker | None = None, run_name: str = "prune") -> dict[str, Any]:
    """The fastest of OPERATING_POINTS whose valid AUC and logloss stay within cfg.prune's tolerances of the
    dense model's (`within_tolerance`), fastest first (`fastest_first`); each candidate is pruned into
    out_dir/candidates/<setting> with the schedule, distillation and re-fit settings of cfg. The chosen one is
    copied to out_dir (best.pt, results.json); `operating_point` in the result lists every setting tried with
    its valid changes. When even the mildest setting misses the tolerance it is kept, `within_tolerance: false`."""
    import shutil

    p, out = cfg.prune, Path(out_dir)
    if p.max_auc_loss < 0 or p.max_logloss_gain < 0 or p.tolerance_se < 0:
        raise DeeplightError("operating point: max_auc_loss, max_logloss_gain and tolerance_se must be >= 0")
    labels, dense_logits = valid_logits(dense_checkpoint, data_dir)  # the dense side of every comparison
    results: dict[int, dict[str, Any]] = {}

    def passes(i: int) -> bool:
        dnn, field, embedding = OPERATING_POINTS[i]
        label = setting_label(OPERATING_POINTS[i])
        target = dataclasses.replace(cfg, prune=dataclasses.replace(
            p, mode="structured", dnn=dnn, field=field, embedding=embedding, auto=False))
        tqdm.write(f"prune: operating point: trying {label}", file=sys.stderr)
        r = prune(dense_checkpoint, data_dir, out / "candidates" / label, target, tracker, f"{run_name}-{label}")
        change = valid_change(labels, dense_logits, valid_logits(Path(r["checkpoint"]), data_dir)[1])
        results[i] = {**r, "candidate": label, "valid_change": change, "ok": within_tolerance(change, p)}
        tqdm.write(f"prune: operating point: {label}: valid AUC {change['auc']:+.4f} (se {change['auc_se']:.4f}), "
                   f"logloss {change['logloss']:+.4f} (se {change['logloss_se']:.4f}): "
                   f"{'within' if results[i]['ok'] else 'outside'} tolerance", file=sys.stderr)
        return results[i]["ok"]

    index, ok = fastest_first(len(OPERATING_POINTS), passes)
    chosen = results[index]
    source = out / "candidates" / chosen["candidate"]
    for name in ("best.pt", "learning_curve.png"):
        if (source / name).exists():
            shutil.copyfile(source / name, out / name)
    tried = [{"setting": r["candidate"], "targets": r["pruning"]["targets"], "valid_auc": r["valid"]["auc"],
              "valid_logloss": r["valid"]["logloss"], "valid_change": r["valid_change"],
              "within_tolerance": r["ok"]} for _, r in sorted(results.items())]
    chosen = {k: v for k, v in chosen.items() if k not in ("ok", "run_id")}
    chosen.update(checkpoint=str(out / "best.pt"), candidate_run_id=results[index].get("run_id"), operating_point={
        "chosen": chosen["candidate"], "within_tolerance": ok, "max_auc_loss": p.max_auc_loss,
        "max_logloss_gain": p.max_logloss_gain, "tolerance_se": p.tolerance_se,
        "searched": [setting_label(x) for x in OPERATING_POINTS], "order": "fastest first, then bisection",
        "tried": tried})
    if not ok:
        tqdm.write(f"prune: operating point: no setting within tolerance of dense; kept the mildest, "
                   f"{chosen['candidate']}", file=sys.stderr)
    write_json(out / "results.json", chosen)
    with (tracker or NullTracker()).run(run_name, tags={"stage": "prune", "operating_point": chosen["candidate"],
                                                         "within_tolerance": str(ok).lower()}) as log:
        log.log_params({**cfg.flat(MODEL_SECTIONS), "data_dir": str(data_dir),
                        "dense_checkpoint": str(dense_checkpoint),
                        "operating_point.searched": ",".join(chosen["operating_point"]["searched"]),
                        "operating_point.tried": ",".join(t["setting"] for t in tried),
                        "operating_point.chosen": chosen["candidate"]})
        log.log_metrics({"best_valid_auc": chosen["valid"]["auc"], "best_valid_logloss": chosen["valid"]["logloss"],
                         "candidates_tried": len(tried), "valid_auc_change": chosen["valid_change"]["auc"],
                         "valid_auc_change_se": chosen["valid_change"]["auc_se"],
                         "valid_logloss_change": chosen["valid_change"]["logloss"],
                         "valid_logloss_change_se": chosen["valid_change"]["logloss_se"],
                         **{f"final_sparsity_{k}": v for k, v in chosen["pruning"]["sparsity"].items()}})
        log.log_artifact(out / "results.json")
        chosen["run_id"] = log.run_id
    return chosen


def prune(dense_checkpoint: str | Path, data_dir: str | Path, out_dir: str | Path, cfg: Config,
          tracker: Tracker | None = None, run_name: str = "prune") -> dict[str, Any]:
    """Prune a trained dense model to cfg.prune's targets (dnn, field, embedding in prune.mode; prune.auto is
    not looked at: see `prune_as_configured`); resumes an unfinished run in out_dir."""
    tracker = tracker or NullTracker()
    targets = Targets.from_config(cfg.prune)
    schedule(1, cfg.prune)  # checks the schedule's settings before any work
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    dense = checkpoint.load_checkpoint(dense_checkpoint)
    manifest = read_manifest(data_dir)
    check_both_classes(data_dir)
    if dense.get("feature_map_fingerprint") != manifest.get("feature_map_fingerprint", ""):
        raise DeeplightError(f"{dense_checkpoint} was trained with another feature map than {data_dir}")
    torch.manual_seed(cfg.train.seed)  # before the model is built: its init draws from the RNG, as in training
    # On train.device before the Pruner builds its masks beside the weights (the Trainer keeps it there)
    model = checkpoint.load_model(dense_checkpoint, dense)[0].to(resolve_device(cfg.train.device)).train()
    teacher = None
    if cfg.prune.distill_weight:
        with torch.random.fork_rng():  # the student's training draws the same random numbers with or without it
            teacher = checkpoint.load_model(dense_checkpoint, dense)[0].eval().requires_grad_(False)
    train_rows = SplitLoader(data_dir, "train").rows
    steps_per_epoch = math.ceil(train_rows / train_batch_size(train_rows, cfg.train))
    ramp_steps, epochs = schedule(steps_per_epoch, cfg.prune)
    pruner = Pruner(model, targets, cfg.prune.mode, ramp_steps, cfg.prune.mask_every)
    trainer = Trainer(model, data_dir, out_dir, cfg, epochs=epochs, hooks=pruner, lr=cfg.prune.lr,
                      teacher=teacher, distill_weight=cfg.prune.distill_weight)
    pruner.attach(trainer.optimizer)
    trainer.try_resume()

    def add_pruning_report(result: dict[str, Any], log: RunLog) -> None:
        result["pruning"] = report(model, manifest["field_names"], targets, cfg.prune.mode)
        result["pruning"].update(ramp_steps=ramp_steps, epochs=epochs, distill_weight=cfg.prune.distill_weight)
        result["dense_valid"] = dense.get("valid", {})
        result["recalibrated"] = {"applied": False}
        if cfg.prune.recalibrate:
            record = recalibrate(model, data_dir, trainer.best_path)
            result["recalibrated"] = record
            result["valid"] = checkpoint.load(trainer.best_path)["valid"]
            if result["test"]:
                result["test"] = evaluate_split(model, data_dir, "test")
            log.log_metrics({"recalibrated_valid_logloss": record["valid_logloss_after"],
                             "recalibrated_temperature": record["temperature"],
                             **{f"test_{k}": v for k, v in result["test"].items() if isinstance(v, (int, float))}})
        log.set_tags({"recalibrated": str(bool(result["recalibrated"]["applied"])).lower()})
        log.log_metrics({f"final_sparsity_{k}": v for k, v in result["pruning"]["sparsity"].items()})

    return trainer.run_tracked(
        tracker, run_name, finish=add_pruning_report, tags={"stage": "prune"},
        params={**cfg.flat(MODEL_SECTIONS), "data_dir": str(data_dir), "dense_checkpoint": str(dense_checkpoint)})
