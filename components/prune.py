"""`prune`: DeepLight pruning of the dense model (DNN, field pairs, embeddings) to the config's targets
(prune.dnn / prune.field / prune.embedding, prune.mode), then fine-tuning with fixed masks. workers > 1: as a
Kubeflow PyTorchJob of that many pods, launched and waited for by this step (deeplight.steps.distributed).

    task = prune(dense=train_task.outputs["model"], hashed=hash_task.outputs["hashed"], config_json=cfg_json,
                 parent_run_id=parent)
    task.outputs["model"]      # Model: best.pt (masks applied), results.json with achieved sparsity, kept pairs
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prune(dense: Input[Model], hashed: Input[Dataset], config_json: str, parent_run_id: str,
          model: Output[Model], metrics: Output[Metrics], workers: int = 1):
    if workers > 1:
        from deeplight.steps.distributed import job_step

        result = job_step("prune", hashed.path, config_json, model.path, parent_run_id, workers, dense_dir=dense.path)
    else:
        from deeplight.steps.pipeline import prune_step

        result = prune_step(dense.path, hashed.path, config_json, model.path, parent_run_id)
    pruning = result["pruning"]
    model.metadata.update({"kind": result["model"], "mlflow_run_id": result["run_id"], "checkpoint": "best.pt",
                           "mode": pruning["mode"], "targets": pruning["targets"]})
    for split in ("valid", "test"):
        for key in ("auc", "logloss"):
            if key in result[split]:
                metrics.log_metric(f"{split}_{key}", result[split][key])
    for component, value in pruning["sparsity"].items():
        metrics.log_metric(f"sparsity_{component}", value)
    metrics.log_metric("nonzero_params", pruning["nonzero"]["total"])
