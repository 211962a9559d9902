"""The sweep pipeline's step bodies (thin KFP wrappers in components/sweep.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from deeplight.base.config import Config, SweepConfig
from deeplight.base.errors import DeeplightError
from deeplight.ops.sweep.run import finalize, open_sweep, run_sweep
from deeplight.ops.sweep.space import SearchSpace, SweepSettings, parse_range
from deeplight.ops.sweep.storage import load_study, open_storage
from deeplight.ops.sweep.trial_log import _tempdir


_S = SweepConfig()


def pipeline_settings(study: str, kfp_run_id: str = "", storage: str = "", n_trials: int = _S.n_trials,
                      sampler: str = _S.sampler, seed: int = _S.seed, tolerance: float = _S.tolerance,
                      dnn_range: str = "", field_range: str = "", embedding_range: str = "", modes: str = "",
                      finetune_range: str = "", latency_calls: int = _S.latency_calls) -> SweepSettings:
    """SweepSettings from a pipeline's plain parameters; every step derives the same settings from them. An
    empty `study` names it after the KFP run (a new study per run); an empty `storage` means
    $DEEPLIGHT_OPTUNA_STORAGE, else the sqlite default (shared only when every step sees the same disk)."""
    space = SearchSpace(dnn=parse_range(dnn_range) if dnn_range else _S.dnn,
                        field=parse_range(field_range) if field_range else _S.field,
                        embedding=parse_range(embedding_range) if embedding_range else _S.embedding,
                        modes=tuple(m.strip() for m in modes.split(",") if m.strip()) or _S.modes,
                        finetune_epochs=parse_range(finetune_range, int) if finetune_range else _S.finetune_epochs)
    return SweepSettings(study=study or f"sweep-{kfp_run_id}", storage=storage or None, n_trials=n_trials,
                         sampler=sampler, seed=seed, tolerance=tolerance, space=space, latency_calls=latency_calls)


def init_step(data_dir: str, config_json: str, settings: SweepSettings, workers: int, parent_run_id: str = ""
              ) -> list[int]:
    """Before the dense model is trained: check every setting, create the study and the sweep's MLflow run
    (a child of the pipeline run). Returns the worker slots the pipeline fans out over."""
    if workers < 1:
        raise DeeplightError(f"workers: want at least 1, got {workers}")
    try:
        base = Config.from_dict(json.loads(config_json))
    except (json.JSONDecodeError, TypeError) as e:
        raise DeeplightError(f"config_json: not a deeplight config ({e})") from None
    open_sweep(data_dir, settings, base, mlflow_parent=parent_run_id or None)
    return list(range(workers))


def worker_step(data_dir: str, dense_dir: str, settings: SweepSettings, out_dir: str) -> int:
    """One ParallelFor worker: trials until the study is complete. Returns the trials it completed."""
    return run_sweep(data_dir, out_dir, settings, dense=Path(dense_dir) / "best.pt", finalize=False)["completed_here"]


def select_step(data_dir: str, dense_dir: str, settings: SweepSettings, model_dir: str, report_dir: str
                ) -> dict[str, Any]:
    """Choose the trade-off (no test scoring: the pipeline's evaluate step does it), write the report to
    report_dir and the chosen checkpoint to model_dir/best.pt."""
    study = load_study(settings.study, open_storage(settings.storage_url()))
    with _tempdir() as tmp:
        summary = finalize(study, data_dir, tmp, tolerance=settings.tolerance, latency_calls=settings.latency_calls,
                           storage_url=settings.storage_url(), dense=Path(dense_dir) / "best.pt", score_test=False)
        final = summary["final"]
        if final.get("checkpoint") is None:
            raise DeeplightError(f"no trial of study {settings.study!r} is within {settings.tolerance} valid AUC of "
                                 f"the dense model ({summary['dense']['valid']['auc']:.5f}): nothing to register")
        Path(model_dir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(final["checkpoint"], Path(model_dir) / "best.pt")
        shutil.copytree(Path(tmp) / "report", report_dir, dirs_exist_ok=True)
    return summary
