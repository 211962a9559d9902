"""`promote`: the promotion gate. Moves the `champion` alias to the `challenger` version when its test AUC is
within `tolerance` of the current champion's (or there is none) and, when `latency_slo_us` > 0, its latency
meets the SLO. Writes the decision (promoted or not, and why).

    task = promote(model_name="deeplight-ctr", tolerance=0.001, latency_slo_us=0.0, parent_run_id=parent)
"""

from kfp import dsl
from kfp.dsl import Artifact, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(model_name: str, tolerance: float, latency_slo_us: float, parent_run_id: str,
            decision: Output[Artifact]) -> bool:
    import json

    from deeplight.steps.pipeline import promote_step

    result = promote_step(model_name, tolerance, latency_slo_us, parent_run_id)
    with open(decision.path, "w") as f:
        json.dump(result, f, indent=2, sort_keys=True, default=str)
    promoted = bool(result.get("promoted", False))
    decision.metadata.update({"promoted": promoted})
    return promoted
