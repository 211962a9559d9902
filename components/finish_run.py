"""`finish_run`: the pipeline's exit handler. Runs after every other step, whether they succeeded or not, and
closes the MLflow parent run of this KFP run as FINISHED or FAILED (keeping the failing step's message in
its `deeplight.error` tag).

    with dsl.ExitHandler(finish_run(kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)):
        ...   # the steps; start_run tags the parent run with the same KFP run id
"""

from kfp import dsl

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finish_run(kfp_run_id: str, status: dsl.PipelineTaskFinalStatus):
    from deeplight.steps.pipeline import finish_pipeline_run

    # An exit task may not take outputs of the steps, so it finds the parent run by the KFP run id.
    finish_pipeline_run(kfp_run_id, status.state, status.error_message or "")
