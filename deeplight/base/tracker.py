"""What training and pruning report while they run, without importing MLflow.

Core code calls a `RunLog`; `deeplight.ops.tracking.MlflowRunLog` sends it to MLflow, `NullRunLog` drops it.
Keeping this seam here is what lets the core modules stay free of mlflow/kfp/optuna imports.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Protocol


class RunLog(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...

    def set_tags(self, tags: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...


class NullRunLog:
    """Drops everything: for runs with tracking turned off, and for tests of the core alone."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass


class Tracker(Protocol):
    """Opens runs: `with tracker.run("train", resume_id=None) as log: log.log_metrics(...)`."""

    def run(self, name: str, resume_id: str | None = None, tags: dict[str, Any] | None = None
            ) -> AbstractContextManager[RunLog]: ...


class NullTracker:
    def run(self, name: str, resume_id: str | None = None, tags: dict[str, Any] | None = None
            ) -> AbstractContextManager[RunLog]:
        return nullcontext(NullRunLog())
