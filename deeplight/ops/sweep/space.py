"""The sweep's settings: the search space over the `prune.*` settings and the run settings."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any


from deeplight.base.config import RegistryConfig, SweepConfig
from deeplight.base.errors import DeeplightError

_SWEEP = SweepConfig()  # every default below comes from the one Config
SAMPLERS = ("tpe", "nsga2", "random")
MODES = ("unstructured", "structured")
OBJECTIVES = ("valid_auc", "latency_us")  # maximize, minimize
DIRECTIONS = ("maximize", "minimize")
ATTR = "deeplight."  # prefix of the study user attrs this module writes
# Settings workers of one study may set differently (they change speed, not results): not compared on joining.
_LOCAL_SETTINGS = ("train.threads", "train.device", "train.checkpoint_every")
_WAIT_S = 60.0  # how long a worker waits for the study creator to record the sweep's metadata


def parse_range(text: str, kind: type = float) -> tuple[Any, Any]:
    """'0.5:0.95' -> (0.5, 0.95); '0.9' -> (0.9, 0.9) (a fixed value).

    >>> parse_range("0.5:0.95"), parse_range("2", int)
    ((0.5, 0.95), (2, 2))
    """
    parts = str(text).split(":")
    try:
        values = tuple(kind(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) not in (1, 2):
        raise DeeplightError(f"search range {text!r}: want LOW:HIGH or a single value, e.g. 0.5:0.95")
    return (values[0], values[-1])


@dataclass(frozen=True)
class SearchSpace:
    """Ranges of the searched `prune.*` settings (LOW == HIGH fixes a setting)."""

    dnn: tuple[float, float] = _SWEEP.dnn
    field: tuple[float, float] = _SWEEP.field
    embedding: tuple[float, float] = _SWEEP.embedding
    modes: tuple[str, ...] = _SWEEP.modes
    finetune_epochs: tuple[int, int] = _SWEEP.finetune_epochs

    @classmethod
    def from_config(cls, sc: SweepConfig) -> "SearchSpace":
        return cls(dnn=tuple(sc.dnn), field=tuple(sc.field), embedding=tuple(sc.embedding),  # type: ignore[arg-type]
                   modes=tuple(sc.modes), finetune_epochs=tuple(sc.finetune_epochs))  # type: ignore[arg-type]

    def validate(self) -> None:
        for name in ("dnn", "field", "embedding"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise DeeplightError(f"search range prune.{name} = {lo}:{hi} is empty (low > high)")
            if not (0.0 <= lo and hi < 1.0) or math.isnan(lo) or math.isnan(hi):
                raise DeeplightError(f"search range prune.{name} = {lo}:{hi} must lie in [0, 1) "
                                     "(a sparsity of 1 would remove the whole component)")
        if not self.modes:
            raise DeeplightError("search space: no pruning mode given (want unstructured and/or structured)")
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise DeeplightError(f"search space: unknown pruning mode(s) {unknown}; choose from {', '.join(MODES)}")
        lo, hi = self.finetune_epochs
        if lo > hi:
            raise DeeplightError(f"search range prune.finetune_epochs = {lo}:{hi} is empty (low > high)")
        if lo < 1:
            raise DeeplightError(f"search range prune.finetune_epochs = {lo}:{hi}: want at least 1 epoch")

    def check_model(self, kind: str) -> None:
        """Fail before training when the model kind has no such component to prune."""
        has = {"dnn": kind == "deepfwfm", "field": kind in ("deepfwfm", "fwfm"), "embedding": kind != "lr"}
        for name, present in has.items():
            if not present and getattr(self, name)[1] > 0:
                raise DeeplightError(f"a {kind} model has no {name} weights to prune: set the {name} range to 0")

    def suggest(self, trial: Any) -> dict[str, Any]:
        """One point of the space as dotted Config settings (the trial's Optuna params have the same names)."""
        p: dict[str, Any] = {f"prune.{c}": trial.suggest_float(f"prune.{c}", *getattr(self, c))
                             for c in ("dnn", "field", "embedding")}
        p["prune.mode"] = trial.suggest_categorical("prune.mode", list(self.modes))
        p["prune.finetune_epochs"] = trial.suggest_int("prune.finetune_epochs", *self.finetune_epochs)
        return p

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SearchSpace":
        return cls(**{k: tuple(v) for k, v in d.items()})


@dataclass(frozen=True)
class SweepSettings:
    """How one sweep runs; defaults from `Config().sweep` (see SweepConfig for what each means)."""

    study: str = _SWEEP.study
    # SQLAlchemy URL; None: $DEEPLIGHT_OPTUNA_STORAGE (keeps a password out of pipeline parameters), else
    # sqlite:///<mlruns>/optuna.db
    storage: str | None = None
    n_trials: int = _SWEEP.n_trials
    sampler: str = _SWEEP.sampler
    seed: int = _SWEEP.seed
    tolerance: float = _SWEEP.tolerance
    space: SearchSpace = field(default_factory=SearchSpace)
    latency_calls: int = _SWEEP.latency_calls
    heartbeat_interval: int = _SWEEP.heartbeat
    grace_period: int | None = None  # a trial silent this long is failed; None: 3 x heartbeat_interval
    experiment: str = RegistryConfig().experiment  # MLflow experiment

    @classmethod
    def from_config(cls, sc: SweepConfig, **kw: Any) -> "SweepSettings":
        """Settings from a Config's sweep section (+ run-only settings: storage, grace_period, experiment)."""
        return cls(study=sc.study, n_trials=sc.n_trials, sampler=sc.sampler, seed=sc.seed, tolerance=sc.tolerance,
                   space=SearchSpace.from_config(sc), latency_calls=sc.latency_calls,
                   heartbeat_interval=sc.heartbeat, **kw)

    def validate(self) -> None:
        self.space.validate()
        if self.sampler not in SAMPLERS:
            raise DeeplightError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.n_trials < 1:
            raise DeeplightError(f"n_trials: want at least 1, got {self.n_trials}")
        if not self.tolerance >= 0:
            raise DeeplightError(f"tolerance: want an AUC difference >= 0, got {self.tolerance}")
        if self.latency_calls < 10:
            raise DeeplightError(f"latency_calls: want at least 10, got {self.latency_calls}")
        if self.heartbeat_interval < 1 or (self.grace_period is not None and self.grace_period <= 0):
            raise DeeplightError("heartbeat_interval must be >= 1 s and grace_period > 0 s")
        if not self.study or len(self.study) > 512:
            raise DeeplightError("study name: want 1 to 512 characters")

    @property
    def grace(self) -> int:
        return self.grace_period or 3 * self.heartbeat_interval

    def storage_url(self) -> str:
        if self.storage or os.environ.get("DEEPLIGHT_OPTUNA_STORAGE"):
            return self.storage or os.environ["DEEPLIGHT_OPTUNA_STORAGE"]
        from deeplight.ops.tracking import mlruns_dir

        mlruns_dir().mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{mlruns_dir() / 'optuna.db'}"
