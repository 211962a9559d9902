"""`ingest_file`: one file of the fan-out pipeline's plan -> its typed Parquet splits and the value counts of its
train split (no threshold: `merge_counts` sums every file's counts before min_count).

    task = ingest_file(item=item)   # inside dsl.ParallelFor(plan.output); the item carries config_json, parent_run_id
    task.outputs["ingested"]   # Dataset: train/ valid/ test/ Parquet, report.json (with "part"), quarantine.jsonl
    task.outputs["counts"]     # Dataset: value_counts.parquet (field, key, count), counts.json
"""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ingest_file(item: dict, ingested: Output[Dataset], counts: Output[Dataset]):
    from deeplight.steps.fanout import ingest_file_step

    report = ingest_file_step(item, item["config_json"], ingested.path, counts.path, item["parent_run_id"])
    ingested.metadata.update({"file": report["part"]["uri"], "index": report["part"]["index"],
                              "rows": report["written"], "splits": report["splits"]})
