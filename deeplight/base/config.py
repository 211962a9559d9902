"""One config object drives the CLI, the KFP components and the Optuna sweep.

    >>> from deeplight.base.config import Config
    >>> cfg = Config()
    >>> cfg.model.kind, cfg.model.embed_dim, cfg.model.dnn
    ('deepfwfm', 10, (400, 400, 400))
    >>> Config.from_dict(cfg.to_dict()) == cfg
    True
    >>> cfg.replace(**{"train.epochs": 3}).train.epochs
    3
    >>> cfg.get("registry.model_name"), cfg.get("promote.tolerance")
    ('deeplight-ctr', 0.001)

Every default lives here once: the CLI's flags, the KFP components' and pipelines' parameters and the sweep read
them from `Config()`, and every command that takes settings accepts `--set section.key=value` (repeatable).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from deeplight.base.errors import DeeplightError


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "criteo"
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_mode: str = "random"  # random (seeded) | sequential (last rows are test)
    seed: int = 0
    max_bad_fraction: float = 0.5  # ingest fails when more than this share of an input's rows is bad


@dataclass(frozen=True)
class FeatureConfig:
    # Exactly one of: a vocabulary with a min-count threshold fitted on train, or stable hashing into buckets.
    min_count: int | None = 8
    buckets: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "deepfwfm"  # deepfwfm | fwfm | fm | lr
    embed_dim: int = 10
    dnn: tuple[int, ...] = (400, 400, 400)
    dropout: float = 0.5
    linear: str = "filv"  # filv | felv | lw
    init_std: float = 0.01


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 2048  # the largest batch; smaller on small data, see min_steps_per_epoch
    # The batch shrinks to rows // min_steps_per_epoch when that is smaller than batch_size, so a small train
    # split still gets enough optimiser steps per epoch (8,000 rows at 2048 would be 4 steps; the issue measured
    # LR 0.7196 AUC at batch 2048 against 0.7426 at 256 on the Criteo sample). No effect above 65,536 rows.
    min_steps_per_epoch: int = 32
    lr: float = 1e-3
    # Adam's (L2) weight decay. 1e-4, with 1e-3 on the DNN, stops the overfitting of embeddings and DNN that
    # otherwise ends training after 1-2 epochs on a 1M-row dataset (bench/RESULTS.md); the paper's 3e-7 was
    # for 45M rows.
    weight_decay: float = 1e-4
    dnn_weight_decay: float | None = 1e-3  # None: the same as weight_decay
    patience: int = 2  # epochs without a better valid AUC before stopping
    seed: int = 0
    shuffle_buffer: int = 262_144  # rows shuffled together; bounds memory
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    device: str = "auto"  # auto (a CUDA GPU when torch sees one, else the CPU) | cpu | cuda[:N] (deeplight.model.device)
    checkpoint_every: int = 500  # batches between mid-epoch resume checkpoints (0: only at epoch ends)
    # dense_adam: fused Adam over every parameter | sparse_adam: Adam on the embedding rows a batch touched, L2 on
    # those rows only (deeplight.model.sparse_optim), fused Adam for the rest. Experimental: on 1M synthetic rows
    # it overfit after epoch 1 (-0.03 test AUC) for ~12% less step time (bench/RESULTS.md, scaling).
    embedding_optimizer: str = "dense_adam"


@dataclass(frozen=True)
class PruneConfig:
    dnn: float = 0.9
    field: float = 0.9
    embedding: float = 0.4
    mode: str = "unstructured"  # unstructured | structured
    ramp_epochs: float = 1.0  # the damped schedule reaches its target after this many epochs of pruning
    finetune_epochs: int = 2
    # Schedules are counted in optimiser steps: the ramp lasts max(ramp_epochs of steps, min_ramp_steps), the
    # fine-tuning at least min_finetune_steps (whole epochs), so small data still gets a gradual ramp.
    min_ramp_steps: int = 100
    min_finetune_steps: int = 100
    mask_every: int = 10  # steps between threshold updates during the ramp
    # Continued training starts from a model already at its best epoch: below the dense lr keeps it there (at the
    # dense lr, a CTR model overfits within an epoch). 3e-4, not the earlier 1e-4: with whole neurons removed the
    # rest of the model must move to take over, and on the real samples 1e-4 cost 0.005-0.018 valid AUC that
    # 3e-4 did not (bench/RESULTS.md, issue 17).
    lr: float = 3e-4
    # Distillation: loss = label BCE + distill_weight * BCE toward the dense model's probabilities (0: off).
    distill_weight: float = 1.0
    # Re-fit a temperature and a bias of the final logit on the valid split (folded into the weights; recorded
    # in results.json, the checkpoint and the evaluation as `recalibrated`).
    recalibrate: bool = False
    # Operating point chosen for you (auto, the default): pruning searches structured settings, fastest first,
    # for the fastest whose valid AUC is at most max_auc_loss below the dense model's and whose valid logloss at
    # most max_logloss_gain above, each widened by tolerance_se paired standard errors of the valid difference
    # (bootstrap for AUC), so ~1,000 valid rows do not turn the choice into a coin toss. auto=false: prune to
    # dnn/field/embedding/mode as given (`deeplight prune` with explicit targets does so).
    auto: bool = True
    max_auc_loss: float = 0.001
    max_logloss_gain: float = 0.002
    tolerance_se: float = 0.0

    def __post_init__(self) -> None:
        # Configs saved before the search was the default (in every older dense checkpoint, which `deeplight
        # prune` starts from) hold None for "no search": the search now needs its budget, so None is the default.
        for name in ("max_auc_loss", "max_logloss_gain"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(type(self), name))


@dataclass(frozen=True)
class SweepConfig:
    """The Optuna sparsity sweep: its search space over `prune.*` and how it runs (`deeplight sweep`)."""

    study: str = "deeplight-sweep"
    n_trials: int = 20  # COMPLETE trials the study ends with, over all workers and restarts
    sampler: str = "tpe"  # tpe | nsga2 | random
    seed: int = 0
    dnn: tuple[float, float] = (0.0, 0.98)  # search ranges LOW, HIGH (equal: a fixed value)
    field: tuple[float, float] = (0.0, 0.98)
    embedding: tuple[float, float] = (0.0, 0.9)
    modes: tuple[str, ...] = ("unstructured", "structured")
    finetune_epochs: tuple[int, int] = (1, 2)
    tolerance: float = 0.001  # the chosen trial's valid AUC may be this much below the dense model's
    latency_calls: int = 2000  # batch-1 calls whose median is a trial's latency
    heartbeat: int = 10  # seconds between a running trial's heartbeats


@dataclass(frozen=True)
class RegistryConfig:
    """Where models and runs are recorded in MLflow."""

    model_name: str = "deeplight-ctr"  # the registered model every command and pipeline uses by default
    experiment: str = "deeplight"


@dataclass(frozen=True)
class PromoteConfig:
    """The promotion gate: challenger -> champion."""

    tolerance: float = 0.001  # largest test AUC drop against the champion that still passes
    latency_slo_us: float | None = None  # largest batch-1 latency that passes (None: not checked)


@dataclass(frozen=True)
class ServeConfig:
    """Serving the registered model (`deeplight serve`, the pyfunc)."""

    host: str = "127.0.0.1"  # a pod in a cluster binds 0.0.0.0 explicitly
    port: int = 8080
    threads: int = 1  # BLAS threads of the engine; 1 avoids the slowdown of BLAS threads under CPU contention
    access_log: bool = False  # a log line per request (costs more than scoring one row; a cluster's ingress logs)


Pod = tuple[str, str, str, str]  # CPU request, CPU limit, memory request, memory limit (Kubernetes quantities)


@dataclass(frozen=True)
class ClusterConfig:
    """Pods of the KFP steps on a cluster (components/resources.py). Compiled into the pipeline spec, not run
    parameters: `deeplight pipeline compile | submit | schedule --set cluster.train='["8","8","16Gi","16Gi"]'`.
    Sized for a Criteo day (~45M rows); the steps stream their data, so memory grows with the vocabulary and the
    model, not with the rows. The steps that time latency (evaluate, sweep_worker, sweep_select) request what
    they limit, CPU and memory: the Guaranteed QoS class, which keeps other pods off their cores while they time."""

    start_run: Pod = ("250m", "1", "512Mi", "1Gi")  # MLflow calls only
    ingest: Pod = ("2", "4", "4Gi", "8Gi")  # parses and writes Parquet in parallel
    hash_features: Pod = ("2", "4", "8Gi", "16Gi")  # value counts of every categorical field
    train: Pod = ("4", "8", "8Gi", "16Gi")  # torch; the embedding table and Adam's moments
    prune: Pod = ("4", "8", "8Gi", "16Gi")  # as train, plus the dense teacher and masks
    evaluate: Pod = ("2", "2", "4Gi", "4Gi")  # latency timing: Guaranteed QoS
    register: Pod = ("1", "2", "2Gi", "4Gi")  # compacts, exports and logs the model
    promote: Pod = ("250m", "1", "512Mi", "1Gi")
    finish_run: Pod = ("250m", "1", "512Mi", "1Gi")
    sweep_init: Pod = ("500m", "1", "1Gi", "2Gi")
    sweep_worker: Pod = ("4", "4", "16Gi", "16Gi")  # trains trials (as prune) and times them: Guaranteed QoS
    sweep_select: Pod = ("2", "2", "4Gi", "4Gi")  # re-times the chosen trial: Guaranteed QoS
    gpus: int = 0  # > 0: train, prune and the sweep workers ask for this many accelerators of gpu_type
    gpu_type: str = "nvidia.com/gpu"
    # train and prune as a Kubeflow PyTorchJob of train_workers pods (deeplight/ops/pytorchjob.py; README: On a
    # cluster), each rank's pod sized as `train` / `prune` above. The pipeline parameter train_workers wins.
    train_workers: int = 1  # 1: the step trains in its own pod, as before
    shared_claim: str = "deeplight-shared"  # ReadWriteMany PVC mounted in the step's pod and every rank's pod
    shared_dir: str = "/mnt/deeplight"  # its mount path: the hashed data goes in, the checkpoints come out
    job_namespace: str = ""  # "": the namespace the step's pod runs in
    job_service_account: str = ""  # "": the namespace's default service account
    job_env_secret: str = "deeplight-env"  # a Secret whose keys (MLFLOW_*, AWS_*) become the ranks' env, if it exists
    job_timeout_s: int = 86400


# Sections a training or pruning run depends on (what its checkpoint and MLflow params record).
MODEL_SECTIONS = ("data", "features", "model", "train", "prune")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def flat(self, sections: tuple[str, ...] | None = None) -> dict[str, Any]:
        """`{"train.epochs": 10, ...}`: the form MLflow params and the sweep use (only `sections` if given)."""
        return {f"{section}.{k}": v for section, values in self.to_dict().items() for k, v in values.items()
                if sections is None or section in sections}

    def get(self, key: str) -> Any:
        """The value of a dotted setting: `Config().get("train.epochs")` -> 10."""
        section, _, name = key.partition(".")
        try:
            if not name or section not in _SECTION_TYPES:
                raise AttributeError(key)
            return getattr(getattr(self, section), name)
        except AttributeError:
            raise DeeplightError(f"config: unknown setting {key!r}") from None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, values in d.items():
            if name not in sections:
                raise DeeplightError(f"config: unknown section {name!r}")
            section_cls = _SECTION_TYPES[name]
            known = {f.name for f in dataclasses.fields(section_cls)}
            unknown = set(values) - known
            if unknown:
                raise DeeplightError(f"config: unknown keys in {name!r}: {sorted(unknown)}")
            kwargs[name] = section_cls(**{k: _tuple_if_list(v) for k, v in values.items()})
        return cls(**kwargs)

    def replace(self, **dotted: Any) -> "Config":
        """A copy with `section.key=value` overrides; `None` values are ignored (unset CLI flags)."""
        d = self.to_dict()
        for key, value in dotted.items():
            if value is None:
                continue
            section, _, name = key.partition(".")
            if section not in d or name not in d[section]:
                raise DeeplightError(f"config: unknown setting {key!r}")
            d[section][name] = value
        return Config.from_dict(d)


_SECTION_TYPES = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def _tuple_if_list(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """`["model.dnn=[16]", "train.epochs=1"]` -> {"model.dnn": [16], "train.epochs": 1} (JSON values, else text).

    >>> parse_sets(["model.dnn=[16]", "prune.mode=structured"])
    {'model.dnn': [16], 'prune.mode': 'structured'}
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise DeeplightError(f"--set {item!r}: want section.key=value, e.g. train.epochs=2")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out
