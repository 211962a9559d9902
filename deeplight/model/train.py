"""Training: streaming batches, Adam, early stopping on valid AUC, resumable checkpoints.

    from deeplight.base.config import Config
    from deeplight.model.train import train
    result = train("data/hashed", "out/dense", Config())   # resumes if out/dense holds an unfinished run
    result["test"]["auc"]

The valid split selects the best epoch; the test split is scored once, at the end, for the report only.
`Trainer` is shared with pruning, which adds a per-step hook and extra state (masks) to the checkpoint, and may
add a teacher: the dense model whose probabilities the pruned one is distilled toward.

The batch is `train.batch_size` unless the train split is small: then rows // `train.min_steps_per_epoch`
(`train_batch_size`), so that 8,000 rows get 32 optimiser steps per epoch instead of 4.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from deeplight.model import checkpoint, distributed

from deeplight.model import metrics
from deeplight.base.config import MODEL_SECTIONS, Config, TrainConfig
from deeplight.data.loader import SplitLoader, check_both_classes, read_manifest
from deeplight.base.errors import DeeplightError
from deeplight.base.progress import progress
from deeplight.base.files import write_json
from deeplight.model.deepfwfm import DeepFwFM
from deeplight.model.sparse_optim import (EMBEDDING_OPTIMIZERS, LazyAdam, SplitOptimizer, embedding_weights,
                                          make_embeddings_sparse)
from deeplight.model.device import resolve as resolve_device, to_device
from deeplight.base.provenance import code_version
from deeplight.base.tracker import NullTracker, RunLog, Tracker

EVAL_BATCH = 16_384


@dataclass
class Progress:
    """Everything besides tensors needed to resume exactly where a run stopped."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches done in the current epoch
    step: int = 0  # optimizer steps overall
    loss_sum: float = 0.0  # running training loss of the current epoch
    loss_rows: int = 0
    seconds: float = 0.0  # training time of the current epoch so far
    best_auc: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    run_id: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)


class TrainHooks(Protocol):
    """Extension points used by pruning."""

    def after_step(self, model: DeepFwFM, step: int) -> None: ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...

    def epoch_metrics(self, model: DeepFwFM) -> dict[str, float]: ...

    def selectable(self) -> bool:
        """Whether the model may be chosen as best now (pruning: only once the target sparsity is reached)."""
        ...


@torch.no_grad()
def predict_logits(model: DeepFwFM, loader: SplitLoader) -> tuple[np.ndarray, np.ndarray]:
    """(labels, logits) over a split, in file order, model in eval mode."""
    was_training = model.training
    model.eval()
    ys, zs = [], []
    device = next(model.parameters()).device
    for ids, y in loader.epoch(0):
        ys.append(y.numpy())
        zs.append(model(ids.to(device)).cpu().numpy())
    model.train(was_training)
    if not ys:
        raise DeeplightError(f"split {loader.split!r} is empty")
    return np.concatenate(ys), np.concatenate(zs)


def predict(model: DeepFwFM, loader: SplitLoader) -> tuple[np.ndarray, np.ndarray]:
    """(labels, click probabilities) over a split, in file order, model in eval mode."""
    labels, logits = predict_logits(model, loader)
    return labels, torch.sigmoid(torch.from_numpy(logits)).numpy()


def evaluate_split(model: DeepFwFM, data_dir: str | Path, split: str) -> dict[str, float]:
    labels, probs = predict(model, SplitLoader(data_dir, split, batch_size=EVAL_BATCH))
    return metrics.evaluate_arrays(labels, probs)


def train_batch_size(rows: int, tc: TrainConfig) -> int:
    """The batch size used on a train split of `rows` rows: batch_size, or smaller so that an epoch has at least
    min_steps_per_epoch optimiser steps (0: always batch_size)."""
    if tc.batch_size < 1:
        raise DeeplightError(f"train.batch_size must be >= 1, got {tc.batch_size}")
    if tc.min_steps_per_epoch <= 0:
        return tc.batch_size
    return max(1, min(tc.batch_size, rows // tc.min_steps_per_epoch))


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_probs: torch.Tensor | None,
                      weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, label loss): label BCE + weight * BCE toward the teacher's probabilities (soft targets)."""
    label_loss = F.binary_cross_entropy_with_logits(logits, labels)
    if teacher_probs is None or not weight:
        return label_loss, label_loss
    return label_loss + weight * F.binary_cross_entropy_with_logits(logits, teacher_probs), label_loss


def param_groups(model: DeepFwFM, tc: TrainConfig, exclude: tuple[torch.nn.Parameter, ...] = ()
                 ) -> list[dict[str, Any]]:
    """Adam parameter groups: the DNN has its own weight decay (`dnn_weight_decay`, default: `weight_decay`).
    Parameters in `exclude` (embedding tables with their own optimiser) are left out."""
    skip = {id(p) for p in exclude}
    named = [(n, p) for n, p in model.named_parameters() if id(p) not in skip]
    dnn = [p for n, p in named if n.startswith("dnn.")]
    rest = [p for n, p in named if not n.startswith("dnn.")]
    dnn_wd = tc.weight_decay if tc.dnn_weight_decay is None else tc.dnn_weight_decay
    return [g for g in ({"params": rest, "weight_decay": tc.weight_decay},
                        {"params": dnn, "weight_decay": dnn_wd}) if g["params"]]


def make_optimizer(model: DeepFwFM, tc: TrainConfig, lr: float) -> torch.optim.Optimizer | SplitOptimizer:
    """`train.embedding_optimizer`: dense_adam = fused Adam over all parameters (fused: one kernel per step, ~2x
    faster than the loop on CPU); sparse_adam = fused Adam for dense parameters + LazyAdam on the embedding rows
    each batch touched (the embeddings are switched to sparse gradients)."""
    kind = tc.embedding_optimizer
    if kind not in EMBEDDING_OPTIMIZERS:
        raise DeeplightError(f"train.embedding_optimizer: unknown {kind!r}; choose one of "
                             f"{', '.join(EMBEDDING_OPTIMIZERS)}")
    tables = tuple(embedding_weights(model)) if kind == "sparse_adam" else ()
    dense = torch.optim.Adam(param_groups(model, tc, exclude=tables), lr=lr, fused=True)
    if not tables:
        return dense
    make_embeddings_sparse(model)
    return SplitOptimizer(dense, LazyAdam(tables, lr=lr, weight_decay=tc.weight_decay))


class Trainer:
    """One resumable training run writing `last.pt` (resume state), `best.pt` and `results.json` to out_dir."""

    def __init__(self, model: DeepFwFM, data_dir: str | Path, out_dir: str | Path, cfg: Config, *,
                 epochs: int, hooks: TrainHooks | None = None, lr: float | None = None,
                 teacher: DeepFwFM | None = None, distill_weight: float = 0.0):
        self.model, self.cfg, self.epochs, self.hooks = model, cfg, epochs, hooks
        # train.device; checkpoints are read back on the CPU. Under torchrun: this rank's place and device.
        self.world, self.device = distributed.world_from_env(resolve_device(cfg.train.device))
        model.to(self.device)
        self.teacher = teacher.to(self.device).eval() if teacher is not None and distill_weight else None
        self.distill_weight = distill_weight
        self.data_dir, self.out_dir = Path(data_dir), Path(out_dir)
        self.manifest = read_manifest(data_dir)
        train_rows = SplitLoader(data_dir, "train").rows
        self.batch_size = train_batch_size(train_rows, cfg.train)  # the global batch, over all ranks
        world = self.world
        if self.batch_size < world.size:
            raise DeeplightError(f"batch {self.batch_size} is smaller than the {world.size} ranks")
        # Each rank: its shard of the train split, batch / world size rows per step.
        self.train_loader = SplitLoader(data_dir, "train", batch_size=self.batch_size // world.size, shuffle=True,
                                        seed=cfg.train.seed, buffer_rows=cfg.train.shuffle_buffer,
                                        shard=(world.rank, world.size))
        if self.train_loader.rows == 0:
            raise DeeplightError(f"{data_dir}: the train split is empty")
        # Collectives need the same number of steps on every rank: the smallest shard's (<= 1 row shorter).
        self.steps_per_epoch = math.ceil((train_rows // world.size) / self.train_loader.batch_size)
        SplitLoader(data_dir, "valid")  # fail now, not after an epoch, when the valid split is missing
        self.optimizer = make_optimizer(model, cfg.train, lr or cfg.train.lr)
        self.progress = Progress()
        self.sync: distributed.GradientSync | None = None
        if world.active:
            distributed.broadcast_parameters(model, world)  # the same start on every rank, whatever the seed
            make_embeddings_sparse(model)  # embedding gradients travel as touched rows, not as tables
            self.sync = distributed.GradientSync(model, world,
                                                 densify=cfg.train.embedding_optimizer == "dense_adam")
            self._reseed()
        self.checkpoint_every = cfg.train.checkpoint_every
        self.out_dir.mkdir(parents=True, exist_ok=True)

    # -- checkpoints ---------------------------------------------------------------------------------------
    @property
    def last_path(self) -> Path:
        return self.out_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out_dir / "best.pt"

    def data_fingerprint(self) -> str:
        fps = self.manifest.get("fingerprints", {})
        return f"{fps.get('train', '?')}:{fps.get('valid', '?')}"

    def _reseed(self) -> None:
        """Ranks draw different dropout masks, and a resumed run the same ones as an uninterrupted one: the RNG is
        a function of (seed, rank, step), set at the start and at every checkpoint."""
        torch.manual_seed(self.cfg.train.seed + 1_000_003 * self.world.rank + 7919 * self.progress.step)

    def _save_last(self) -> None:
        if self.world.active:
            self._reseed()
        if not self.world.main:
            return
        checkpoint.save({
            "spec": self.model.spec, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "rng": torch.get_rng_state(), "progress": asdict(self.progress), "config": self.cfg.to_json(),
            "data_fingerprint": self.data_fingerprint(), "extra": self.hooks.state() if self.hooks else {},
            "world_size": self.world.size,
        }, self.last_path)

    def try_resume(self) -> bool:
        """Load `last.pt` when present; refuse a checkpoint of another config or dataset."""
        # Rank 0 reads the checkpoint and hands it to the other ranks (they need no shared disk).
        ck = distributed.broadcast(checkpoint.load(self.last_path) if self.world.main and self.last_path.exists()
                                   else None, self.world)
        if ck is None:
            return False
        # Compared as Config objects: a checkpoint written before a setting existed gets its default.
        if Config.from_dict(json.loads(ck["config"])) != self.cfg:
            raise DeeplightError(f"{self.out_dir} holds a run with a different config; use another --out "
                                 "or delete it")
        if ck["data_fingerprint"] != self.data_fingerprint():
            raise DeeplightError(f"{self.out_dir} holds a run on different data; use another --out or delete it")
        saved_world = ck.get("world_size", 1)
        if saved_world != self.world.size and ck["progress"]["batch"]:
            raise DeeplightError(f"{self.last_path} stopped mid-epoch with {saved_world} rank(s); resume it with "
                                 f"{saved_world}, not {self.world.size} (the shards and batches differ)")
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"])
        self.progress = Progress(**ck["progress"])
        if self.hooks:
            self.hooks.load_state(to_device(ck["extra"], self.device))
        if self.world.active:
            self._reseed()
        if self.world.main:
            print(f"resuming {self.last_path}: {self.progress.epoch} epoch(s) and {self.progress.batch} batch(es) "
                  "done", file=sys.stderr, flush=True)
        return True

    def _save_best(self, valid: dict[str, float]) -> None:
        if not self.world.main:
            return
        checkpoint.save({
            "spec": self.model.spec, "model": self.model.state_dict(), "config": self.cfg.to_json(),
            "epoch": self.progress.epoch, "valid": valid, "field_names": self.manifest["field_names"],
            "feature_map_fingerprint": self.manifest.get("feature_map_fingerprint", ""),
            "dataset": self.manifest.get("dataset", ""), "extra": self.hooks.state() if self.hooks else {},
        }, self.best_path)

    # -- the loop ------------------------------------------------------------------------------------------
    def run(self, log: RunLog) -> dict[str, Any]:
        p, cfg = self.progress, self.cfg
        while p.epoch < self.epochs and p.bad_epochs < max(cfg.train.patience, 1):
            self._train_epoch()
            valid = self._evaluate("valid")
            extra = self.hooks.epoch_metrics(self.model) if self.hooks else {}
            loss_sum, loss_rows = distributed.sum_over_ranks([p.loss_sum, p.loss_rows], self.world)
            epoch_metrics = {"train_loss": loss_sum / max(loss_rows, 1), "valid_auc": valid["auc"],
                             "valid_logloss": valid["logloss"], "samples_per_s": loss_rows / max(p.seconds, 1e-9),
                             **extra}
            if self.sync is not None:
                epoch_metrics.update(self.sync.stats.per_step())
            log.log_metrics(epoch_metrics, step=p.epoch)
            p.history.append({"epoch": p.epoch, **epoch_metrics})
            if self.world.main:
                print(f"epoch {p.epoch + 1}/{self.epochs} done: valid AUC {valid['auc']:.4f}, logloss "
                      f"{valid['logloss']:.4f}, train loss {epoch_metrics['train_loss']:.4f}, "
                      f"{epoch_metrics['samples_per_s']:,.0f} samples/s", file=sys.stderr, flush=True)
            if self.hooks is None or self.hooks.selectable():
                if valid["auc"] > p.best_auc:
                    p.best_auc, p.best_epoch, p.bad_epochs = valid["auc"], p.epoch, 0
                    self._save_best(valid)
                else:
                    p.bad_epochs += 1
            p.epoch, p.batch, p.loss_sum, p.loss_rows, p.seconds = p.epoch + 1, 0, 0.0, 0, 0.0
            self._save_last()
        return self._final_report(log)

    def run_tracked(self, tracker: Tracker, run_name: str, params: dict[str, Any], tags: dict[str, Any] | None = None,
                    finish: Callable[[dict[str, Any], RunLog], None] | None = None) -> dict[str, Any]:
        """`run` inside its MLflow run (reopened on resume): params and provenance tags once, then results.json,
        the learning curve and best.pt as artifacts. `finish` extends the result before it is written."""
        if not self.world.main:  # ranks > 0 train and evaluate with rank 0 but write and track nothing
            with NullTracker().run(run_name) as log:
                return self.run(log)
        with tracker.run(run_name, resume_id=self.progress.run_id) as log:
            if self.progress.run_id is None:  # a fresh run, or one killed before its first checkpoint
                self.progress.run_id = log.run_id
                log.log_params(params)
                log.set_tags({"data_fingerprint": self.data_fingerprint(), "code_version": code_version(),
                              "dataset": self.manifest.get("dataset", ""),
                              "feature_map_fingerprint": self.manifest.get("feature_map_fingerprint", ""),
                              **(tags or {})})
            result = self.run(log)
            if finish is not None:
                finish(result, log)
            write_json(self.out_dir / "results.json", result)
            from deeplight.base.plots import learning_curve  # matplotlib only when a run finishes

            curve = learning_curve(result["history"], self.out_dir / "learning_curve.png")
            for path in (curve, self.out_dir / "results.json", self.best_path):
                log.log_artifact(path)
            result["run_id"] = log.run_id
        return result

    def _train_epoch(self) -> None:
        p, model = self.progress, self.model
        model.train()
        bar = progress(total=self.train_loader.rows, initial=min(p.batch * self.train_loader.batch_size,
                                                                  self.train_loader.rows),
                       unit="samples", desc=f"epoch {p.epoch + 1}/{self.epochs}", leave=False)
        started = time.perf_counter()
        for ids, y in self.train_loader.epoch(p.epoch, skip_batches=p.batch):
            if self.world.active and p.batch >= self.steps_per_epoch:
                break  # this rank's shard is one row longer than the shortest
            ids, y = ids.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            soft = None
            if self.teacher is not None:
                with torch.no_grad():
                    soft = torch.sigmoid(self.teacher(ids))
            loss, label_loss = distillation_loss(model(ids), y, soft, self.distill_weight)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.sync is not None:
                self.sync()
            self.optimizer.step()
            p.step += 1
            p.batch += 1
            if self.hooks:
                self.hooks.after_step(model, p.step)
            p.loss_sum += label_loss.item() * len(y)  # the label loss: comparable with and without a teacher
            p.loss_rows += len(y)
            bar.update(len(y))
            bar.set_postfix(loss=f"{p.loss_sum / p.loss_rows:.4f}")
            if self.checkpoint_every and p.batch % self.checkpoint_every == 0:
                p.seconds += time.perf_counter() - started
                started = time.perf_counter()
                self._save_last()
        p.seconds += time.perf_counter() - started
        bar.close()

    def _evaluate(self, split: str) -> dict[str, float]:
        """Metrics of `split`; with several ranks each predicts its shard and the predictions are gathered."""
        if not self.world.active:
            return evaluate_split(self.model, self.data_dir, split)
        loader = SplitLoader(self.data_dir, split, batch_size=EVAL_BATCH, shard=(self.world.rank, self.world.size))
        labels, probs = predict(self.model, loader) if loader.rows else (np.zeros(0, np.float32),) * 2
        return metrics.evaluate_arrays(*distributed.gather_arrays([labels, probs], self.world))

    def _check_ranks_agree(self) -> dict[str, Any]:
        """Digests of every rank's weights and hook state (pruning masks): a DeeplightError unless all equal."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.hooks:
            tensors.update({f"hook.{k}": v for k, v in _flat_tensors(self.hooks.state()).items()})
        digests = distributed.digests_over_ranks(distributed.state_digest(tensors), self.world)
        if len(set(digests)) != 1:
            raise DeeplightError(f"data-parallel ranks ended with different weights or masks: digests {digests}")
        return {"world_size": self.world.size, "rank_digests": digests, **self.sync.stats.per_step()}

    def _final_report(self, log: RunLog) -> dict[str, Any]:
        p = self.progress
        best = distributed.broadcast(checkpoint.load(self.best_path) if self.world.main else None, self.world)
        self.model.load_state_dict(best["model"])
        if self.hooks:
            self.hooks.load_state(to_device(best["extra"], self.device))
        valid = best["valid"]
        test = self._evaluate("test") if self.manifest["rows"].get("test") else {}
        result = {
            "model": self.model.spec["kind"], "best_epoch": p.best_epoch, "epochs_run": p.epoch,
            "batch_size": self.batch_size, "steps": p.step,
            "valid": valid, "test": test, "history": p.history,
            "params": self.model.param_counts(), "data_fingerprint": self.data_fingerprint(),
            "feature_map_fingerprint": self.manifest.get("feature_map_fingerprint", ""),
            "code_version": code_version(), "checkpoint": str(self.best_path),
        }
        if self.world.active:
            result["distributed"] = self._check_ranks_agree()
        log.log_metrics({"best_valid_auc": valid["auc"], "best_valid_logloss": valid["logloss"],
                         **({f"test_{k}": v for k, v in test.items() if isinstance(v, (int, float))})})
        return result


def _flat_tensors(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors in a nested dict (hook state), by dotted path."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    if isinstance(state, dict):
        return {k: v for key, value in state.items() for k, v in _flat_tensors(value, f"{prefix}.{key}").items()}
    return {}


def train(data_dir: str | Path, out_dir: str | Path, cfg: Config, tracker: Tracker | None = None,
          run_name: str = "train") -> dict[str, Any]:
    """Train a dense model (cfg.model.kind) on a hashed dataset; resumes an unfinished run in out_dir."""
    tracker = tracker or NullTracker()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    manifest = read_manifest(data_dir)
    check_both_classes(data_dir)
    torch.manual_seed(cfg.train.seed)
    model = DeepFwFM.from_config(manifest["field_sizes"], cfg.model)
    trainer = Trainer(model, data_dir, out_dir, cfg, epochs=cfg.train.epochs)
    trainer.try_resume()
    return trainer.run_tracked(tracker, run_name, params={**cfg.flat(MODEL_SECTIONS), "data_dir": str(data_dir)})
