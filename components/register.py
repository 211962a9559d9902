"""`register`: register a model in the MLflow Model Registry under `model_name` with alias `challenger`,
with its evaluation metrics, the feature map needed to serve it and its served latency (raw rows through
the registered pyfunc, 1 and 1,000 rows) beside the dense model's. Returns the new version.

    task = register(model=prune_task.outputs["model"], hashed=hash_task.outputs["hashed"],
                    evaluation=eval_task.outputs["evaluation"], dense=train_task.outputs["model"],
                    model_name="deeplight-ctr", parent_run_id=parent)
    task.outputs["Output"]     # the new version ("1", "2", ...); task.outputs["registered"]: its JSON
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(model: Input[Model], hashed: Input[Dataset], evaluation: Input[Artifact], dense: Input[Model],
             model_name: str, parent_run_id: str, registered: Output[Artifact]) -> str:
    import json

    from deeplight.steps.pipeline import register_step

    info = register_step(model.path, hashed.path, evaluation.path, model_name, parent_run_id, dense_dir=dense.path)
    with open(registered.path, "w") as f:
        json.dump(info, f, indent=2, sort_keys=True, default=str)
    registered.metadata.update({"name": str(info.get("name", model_name)), "version": str(info.get("version", ""))})
    return str(info.get("version", ""))
