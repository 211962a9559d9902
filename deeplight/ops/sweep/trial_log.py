"""MLflow: one child run per trial, open while the trial runs, under the sweep's parent run."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator


from deeplight.ops.sweep.space import ATTR


class TrialLogger:
    """Mirrors Optuna trials into MLflow child runs of the sweep's parent run.

    `child_run(trial)` opens the trial's run (pruning logs its epochs into it); as an Optuna callback it logs the
    trial's objectives, achieved sparsity and kept pairs and closes the run; as the storage's heartbeat-stale
    callback it closes the run of a trial whose worker died as FAILED."""

    def __init__(self, experiment: str, parent_run_id: str, tags: dict[str, str]):
        from deeplight.ops.tracking import MlflowTracker

        self.tracker = MlflowTracker(experiment, parent_run_id=parent_run_id)
        self.client, self.parent_run_id, self.tags = self.tracker.client, parent_run_id, tags

    @contextlib.contextmanager
    def child_run(self, trial: Any) -> Iterator[Any]:
        from deeplight.ops.tracking import PARENT_TAG, MlflowRunLog

        run = self.client.create_run(self.tracker.experiment_id, run_name=f"trial-{trial.number}", tags={
            **self.tags, PARENT_TAG: self.parent_run_id, "optuna.trial_number": str(trial.number),
            "deeplight.step": "sweep_trial"})
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        try:
            yield MlflowRunLog(self.client, run.info.run_id)
        except BaseException:
            self.client.set_terminated(run.info.run_id, status="FAILED")
            raise

    def __call__(self, study: Any, trial: Any) -> None:
        """Optuna callback, after each trial of this worker."""
        from deeplight.ops.tracking import MlflowRunLog

        run_id = trial.user_attrs.get("mlflow_run_id")
        if not run_id:  # surplus trials never opened a run
            return
        if trial.state.name != "COMPLETE":
            self.client.set_terminated(run_id, status="FAILED")
            return
        log = MlflowRunLog(self.client, run_id)
        attrs = trial.user_attrs
        # objective_*: what Optuna saw (pruning's own per-epoch `valid_auc` history is in the same run)
        log.log_metrics({"objective_valid_auc": trial.values[0], "objective_latency_us": trial.values[1],
                         "valid_logloss": attrs.get("valid_logloss"), "nonzero_params": attrs.get("nonzero"),
                         "kept_pairs": len(attrs.get("kept_pairs", [])),
                         **{f"sparsity_{k}": v for k, v in attrs.get("sparsity", {}).items()}})
        from deeplight.ops.registry import machine_tags  # the host the latency objective was timed on

        log.set_tags({"optuna.state": "COMPLETE", "top_kept_pairs": ", ".join(attrs.get("top_pairs", [])[:10]),
                      **machine_tags()})
        fields = (study.user_attrs.get(ATTR + "data") or {}).get("fields") or []
        pairs = [{"pair": f"{fields[i]} x {fields[j]}" if fields else f"{i} x {j}", "i": i, "j": j, "r": r}
                 for i, j, r in attrs.get("kept_pairs", [])]
        with _tempdir() as tmp:
            path = Path(tmp) / "kept_pairs.json"
            path.write_text(json.dumps(pairs, indent=1))  # strongest first
            log.log_artifact(path)
        self.client.set_terminated(run_id, status="FINISHED")

    def on_stale(self, study: Any, trial: Any) -> None:
        """Heartbeat-stale callback: the trial was just marked FAIL because its worker stopped beating.

        A worker can die after opening the trial's run but before recording its id in the trial, so the run is
        also looked up by its tags (study, parent run, trial number); without that it would stay RUNNING.
        """
        from deeplight.ops.tracking import PARENT_TAG

        run_ids = {trial.user_attrs.get("mlflow_run_id")} - {None}
        if not run_ids:
            found = self.client.search_runs(
                [self.tracker.experiment_id],
                filter_string=" and ".join(f"tags.`{k}` = '{v}'" for k, v in {
                    "optuna.study": self.tags.get("optuna.study", ""), PARENT_TAG: self.parent_run_id,
                    "optuna.trial_number": str(trial.number), "deeplight.step": "sweep_trial"}.items()))
            run_ids = {r.info.run_id for r in found}
        for run_id in sorted(run_ids):
            self.client.set_tag(run_id, "optuna.state", "FAIL (worker died: heartbeat stale)")
            self.client.set_terminated(run_id, status="FAILED")


class _OpenRun:
    """A Tracker handing pruning the trial's already-open run (TrialLogger closes it)."""

    def __init__(self, log: Any):
        self.log = log

    @contextlib.contextmanager
    def run(self, name: str, resume_id: str | None = None, tags: dict[str, Any] | None = None) -> Iterator[Any]:
        if tags:
            self.log.set_tags(tags)
        yield self.log


@contextlib.contextmanager
def _tempdir() -> Iterator[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        yield tmp
