"""One config object drives the CLI, the KFP components and the Optuna sweep.

    >>> from deeplight.base.config import Config
    >>> cfg = Config()
    >>> cfg.model.kind, cfg.model.embed_dim, cfg.model.dnn
    ('deepfwfm', 10, (400, 400, 400))
    >>> Config.from_dict(cfg.to_dict()) == cfg
    True
    >>> cfg.replace(**{"train.epochs": 3}).train.epochs
    3
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
    batch_size: int = 2048
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
    checkpoint_every: int = 500  # batches between mid-epoch resume checkpoints (0: only at epoch ends)


@dataclass(frozen=True)
class PruneConfig:
    dnn: float = 0.9
    field: float = 0.9
    embedding: float = 0.4
    mode: str = "unstructured"  # unstructured | structured
    ramp_epochs: float = 1.0  # the damped schedule reaches its target after this many epochs of pruning
    finetune_epochs: int = 2
    mask_every: int = 10  # steps between threshold updates during the ramp
    lr: float = 1e-4  # continued training starts from a model already at its best epoch: a tenth of the dense
    # lr keeps it there (at the dense lr, a CTR model overfits within an epoch, see bench/RESULTS.md)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def flat(self) -> dict[str, Any]:
        """`{"train.epochs": 10, ...}`: the form MLflow params and the sweep use."""
        return {f"{section}.{k}": v for section, values in self.to_dict().items() for k, v in values.items()}

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


_SECTION_TYPES = {"data": DataConfig, "features": FeatureConfig, "model": ModelConfig, "train": TrainConfig,
                  "prune": PruneConfig}


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
