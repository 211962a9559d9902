"""Optuna storage (sqlite by default, any RDB URL), samplers reseeded per trial, opening or joining a study."""

from __future__ import annotations

import random
import time
import warnings
from typing import Any


from deeplight.base.errors import DeeplightError

from deeplight.ops.sweep.space import ATTR, DIRECTIONS, SAMPLERS, SweepSettings, _WAIT_S


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 on_stale: Any = None) -> Any:
    """Optuna's RDBStorage on `url`; a DeeplightError naming the (redacted) URL when it cannot be reached."""
    import optuna

    from deeplight.ops.tracking import redact

    given, url = url, _with_driver(url)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several processes on one file: wait for the write lock instead of failing at once.
        engine_kwargs["connect_args"] = {"timeout": 60}
    elif url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                  heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                                  heartbeat_stale_trial_callback=on_stale)
        except Exception as e:  # driver missing, bad URL, server down, file not writable: all user-fixable
            if _creation_race(e) and attempt < 4:
                # Workers starting together on an empty database race to create Optuna's tables (PostgreSQL:
                # duplicate pg_type key); the loser retries and finds them.
                time.sleep(0.5 + random.random())
                continue
            reason = redact(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            raise DeeplightError(f"cannot open the Optuna storage {redact(given)}: {type(e).__name__}: "
                                 f"{reason}") from None
    raise AssertionError("unreachable")


def _creation_race(e: Exception) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return any(k in text for k in ("duplicate key", "already exists", "uniqueviolation", "integrityerror"))


def _with_driver(url: str) -> str:
    """`postgresql://` with the driver that is installed: SQLAlchemy 2.1 defaults to psycopg 3, the lock pins
    psycopg2-binary."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def _make_sampler(name: str, seed: int) -> Any:
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def _sampler_class() -> type:
    import optuna

    class PerTrialSeededSampler(optuna.samplers.BaseSampler):
        """A sampler reseeded for every trial from (seed, trial number). One seeded sampler per worker would make
        two workers (or a restarted one) draw the same parameters again; this keeps runs reproducible without
        that. The wrapped samplers keep no state of their own between trials (they read the storage)."""

        def __init__(self, name: str, seed: int):
            self.name, self.seed = name, seed
            self._inner = _make_sampler(name, seed)

        def before_trial(self, study: Any, trial: Any) -> None:
            self._inner = _make_sampler(self.name, (self.seed * 1_000_003 + trial.number) % 2**32)
            self._inner.before_trial(study, trial)

        def infer_relative_search_space(self, study: Any, trial: Any) -> Any:
            return self._inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study: Any, trial: Any, search_space: Any) -> Any:
            return self._inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
            return self._inner.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            self._inner.after_trial(study, trial, state, values)

    return PerTrialSeededSampler


def make_sampler(name: str, seed: int) -> Any:
    if name not in SAMPLERS:
        raise DeeplightError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return _sampler_class()(name, seed)


def load_study(name: str, storage: Any, sampler: Any = None) -> Any:
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        raise DeeplightError(f"no study {name!r} in the Optuna storage") from None


def _open_study(storage: Any, settings: SweepSettings, meta: dict[str, Any]) -> tuple[Any, bool]:
    """(study, created). Exactly one of several racing workers creates it (the name is unique in the storage)
    and records the sweep's metadata; the others check theirs against it."""
    import optuna

    sampler = make_sampler(settings.sampler, settings.seed)
    try:
        study = optuna.create_study(storage=storage, study_name=settings.study, directions=list(DIRECTIONS),
                                    sampler=sampler)
        for key, value in meta.items():
            study.set_user_attr(ATTR + key, value)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        pass
    study = load_study(settings.study, storage, sampler)
    if [d.name.lower() for d in study.directions] != list(DIRECTIONS):
        raise DeeplightError(f"study {settings.study!r} exists with other objectives; use another --study")
    # The creator writes the metadata one attr at a time: wait for all of it, not the first, or a worker that
    # loads the study between two writes reports a mismatch that is not there.
    attrs = _wait_for_attrs(study, list(meta))
    if not any(ATTR + key in attrs for key in meta):  # the creator died before recording anything: adopt it
        for key, value in meta.items():
            study.set_user_attr(ATTR + key, value)
        return study, False
    for key, what in (("space", "search space"), ("config", "base config"), ("data", "data")):
        if attrs.get(ATTR + key) != meta[key]:
            diff = _diff(attrs.get(ATTR + key) or {}, meta[key])
            raise DeeplightError(f"study {settings.study!r} was started with another {what} ({diff}); run the "
                                 "same command to resume it, or use another --study")
    return study, False


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4]) or "?"


def _wait_for_attrs(study: Any, keys: list[str], timeout: float = _WAIT_S) -> dict[str, Any]:
    """The study's user attrs once all of `keys` are recorded (or as they are after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        attrs = study.user_attrs
        if all(attrs.get(ATTR + key) is not None for key in keys) or time.monotonic() > deadline:
            return attrs
        time.sleep(0.5)


def _wait_for_attr(study: Any, key: str, timeout: float = _WAIT_S) -> Any:
    """A study user attr another worker is about to write (None after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        value = study.user_attrs.get(ATTR + key)
        if value is not None or time.monotonic() > deadline:
            return value
        time.sleep(0.5)
