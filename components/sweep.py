"""Sweep components: `sweep_init` (check the settings, create the Optuna study and its MLflow run),
`sweep_worker` (one of N ParallelFor workers sharing the study through its RDB storage) and `sweep_select`
(choose the fastest trial within the AUC tolerance of dense; the Pareto report). Thin wrappers over
`deeplight.steps.sweep`; pipelines/sweep_pipeline.py chains them with the pipeline's ingest, hash_features, train,
evaluate and register components.

    slots = sweep_init(hashed=data, config_json=cfg, parent_run_id=parent, workers=2, **sweep)   # -> [0, 1]
    with dsl.ParallelFor(slots.output) as slot:
        worker = sweep_worker(hashed=data, dense=dense.outputs["model"], slot=slot, **sweep)
    chosen = sweep_select(hashed=data, dense=dense.outputs["model"],
                          completed=dsl.Collected(worker.outputs["Output"]), **sweep)
    chosen.outputs["model"]    # Model: best.pt of the chosen trial;  chosen.outputs["report"]: report.md + plots

`sweep` holds the same settings for every step (study, kfp_run_id, storage, n_trials, sampler, seed,
tolerance, dnn_range, field_range, embedding_range, modes, finetune_range, latency_calls): each step builds
identical SweepSettings from them. Workers find the study and the sweep's MLflow run in the storage.
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def sweep_init(hashed: Input[Dataset], config_json: str, parent_run_id: str, workers: int, study: str,
               kfp_run_id: str, storage: str, n_trials: int, sampler: str, seed: int, tolerance: float,
               dnn_range: str, field_range: str, embedding_range: str, modes: str, finetune_range: str,
               latency_calls: int) -> list:
    from deeplight.steps.pipeline import step
    from deeplight.steps.sweep import init_step, pipeline_settings

    with step("sweep_init", parent_run_id):
        settings = pipeline_settings(study, kfp_run_id, storage, n_trials, sampler, seed, tolerance, dnn_range,
                                     field_range, embedding_range, modes, finetune_range, latency_calls)
        return init_step(hashed.path, config_json, settings, workers, parent_run_id)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def sweep_worker(hashed: Input[Dataset], dense: Input[Model], slot: int, parent_run_id: str, study: str,
                 kfp_run_id: str, storage: str, n_trials: int, sampler: str, seed: int, tolerance: float,
                 dnn_range: str, field_range: str, embedding_range: str, modes: str, finetune_range: str,
                 latency_calls: int, trials: Output[Artifact]) -> int:
    from deeplight.steps.pipeline import step
    from deeplight.steps.sweep import pipeline_settings, worker_step

    with step(f"sweep_worker_{slot}", parent_run_id):
        settings = pipeline_settings(study, kfp_run_id, storage, n_trials, sampler, seed, tolerance, dnn_range,
                                     field_range, embedding_range, modes, finetune_range, latency_calls)
        completed = worker_step(hashed.path, dense.path, settings, trials.path)
    trials.metadata.update({"slot": slot, "completed": completed})
    return completed


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def sweep_select(hashed: Input[Dataset], dense: Input[Model], completed: list, parent_run_id: str, study: str,
                 kfp_run_id: str, storage: str, n_trials: int, sampler: str, seed: int, tolerance: float,
                 dnn_range: str, field_range: str, embedding_range: str, modes: str, finetune_range: str,
                 latency_calls: int, model: Output[Model], report: Output[Artifact], metrics: Output[Metrics]):
    from deeplight.steps.pipeline import step
    from deeplight.steps.sweep import pipeline_settings, select_step

    with step("sweep_select", parent_run_id):
        settings = pipeline_settings(study, kfp_run_id, storage, n_trials, sampler, seed, tolerance, dnn_range,
                                     field_range, embedding_range, modes, finetune_range, latency_calls)
        summary = select_step(hashed.path, dense.path, settings, model.path, report.path)
    final = summary["final"]
    chosen = next(r for r in summary["trials"] if r["number"] == final["chosen"])
    model.metadata.update({"checkpoint": "best.pt", "study": summary["study"], "trial": final["chosen"],
                           "mlflow_run_id": chosen.get("mlflow_run_id", ""), "params": chosen["params"]})
    report.metadata.update({"file": "report.md", "workers_completed": completed})
    metrics.log_metric("chosen_valid_auc", chosen["valid_auc"])
    metrics.log_metric("chosen_latency_us", final["chosen_latency_us"])
    metrics.log_metric("dense_latency_us", final["dense_latency_us"])
    metrics.log_metric("speedup", final["speedup"])
    metrics.log_metric("trials_complete", summary["states"].get("COMPLETE", 0))
