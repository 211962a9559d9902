"""`evaluate`: score a model on the held-out test split as it is served (compact engine): AUC, logloss,
calibration, batch-1 and batch-4096 latency, size on disk, sparsity; ROC, calibration and field-pair plots.
`variant` (dense | pruned) names the child run (evaluate-<variant>) and prefixes the metrics copied onto the
pipeline's parent run (pruned_test_auc, pruned_latency_us_b1, pruned_model_bytes, ...).

    task = evaluate(model=prune_task.outputs["model"], hashed=hash_task.outputs["hashed"], variant="pruned",
                    parent_run_id=parent)
    task.outputs["evaluation"] # Artifact: a directory with metrics.json and plots/
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(model: Input[Model], hashed: Input[Dataset], variant: str, parent_run_id: str,
             evaluation: Output[Artifact], metrics: Output[Metrics]):
    from deeplight.evaluation.evaluate import flat_metrics
    from deeplight.steps.pipeline import evaluate_step

    result = evaluate_step(model.path, hashed.path, variant, evaluation.path, parent_run_id)
    evaluation.metadata.update({"variant": variant, "file": "metrics.json"})
    for key, value in flat_metrics(result).items():
        metrics.log_metric(key, value)
