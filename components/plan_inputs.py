"""`plan_inputs`: the fan-out pipeline's work list, one item per input file (an s3:// prefix ending in "/" is
listed), each with the global index of its first row so that every file's rows get the splits one `ingest` of
all files would give them (deeplight.data.ingest.plan_files).

    task = plan_inputs(input_uris=["s3://bucket/day_0/"], config_json=cfg, parent_run_id=parent)
    with dsl.ParallelFor(task.output) as item: ...   # {"index", "uri", "rows", "first_row", "rows_total",
                                                     #  "config_json", "parent_run_id"}
"""

from kfp import dsl

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def plan_inputs(input_uris: list, config_json: str, parent_run_id: str) -> list:
    from deeplight.steps.fanout import plan_step

    # Each item carries the run's config and parent run: inside a ParallelFor, KFP 2.17's local runner hands every
    # parameter that is another task's output the loop item instead (tests/test_fanout.py runs it).
    return [{**item, "config_json": config_json, "parent_run_id": parent_run_id}
            for item in plan_step(input_uris, config_json, parent_run_id)]
