"""`train`: train the dense DeepFwFM (config model.*, train.*) with early stopping on valid AUC. workers > 1: as a
Kubeflow PyTorchJob of that many pods, launched and waited for by this step (deeplight.steps.distributed).

    task = train(hashed=hash_task.outputs["hashed"], config_json=cfg_json, parent_run_id=parent)
    task.outputs["model"]      # Model: a directory with best.pt, results.json, learning_curve.png
    task.outputs["metrics"]    # Metrics: valid/test AUC and logloss, parameter count
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(hashed: Input[Dataset], config_json: str, parent_run_id: str, model: Output[Model],
          metrics: Output[Metrics], workers: int = 1):
    if workers > 1:
        from deeplight.steps.distributed import job_step

        result = job_step("train", hashed.path, config_json, model.path, parent_run_id, workers)
    else:
        from deeplight.steps.pipeline import train_step

        result = train_step(hashed.path, config_json, model.path, parent_run_id)
    model.metadata.update({"kind": result["model"], "mlflow_run_id": result["run_id"],
                           "best_epoch": result["best_epoch"], "checkpoint": "best.pt"})
    for split in ("valid", "test"):
        for key in ("auc", "logloss"):
            if key in result[split]:
                metrics.log_metric(f"{split}_{key}", result[split][key])
    metrics.log_metric("params", result["params"]["total"])
