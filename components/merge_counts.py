"""`merge_counts`: the per-file ingest reports merged (child run `ingest`) and one feature map fitted on the summed
value counts of every file's train split (min_count over the whole split). Its output list is the work of the
second fan-out: one item per file with the URI of that file's ingested artifact (`dsl.importer` brings exactly that
one artifact into each `apply_features` task).

    merged = merge_counts(ingested=dsl.Collected(files.outputs["ingested"]),
                          counts=dsl.Collected(files.outputs["counts"]), config_json=cfg, parent_run_id=parent)
    merged.outputs["feature_map"]   # Artifact: feature_map.json, report.json, quarantine.jsonl (all files)
    merged.outputs["Output"]        # [{"index", "uri", "ingested_uri", "parent_run_id"}, ...] in file order
"""

from typing import List

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def merge_counts(ingested: Input[List[Dataset]], counts: Input[List[Dataset]], config_json: str, parent_run_id: str,
                 feature_map: Output[Artifact], metrics: Output[Metrics]) -> list:
    import json
    import os

    from deeplight.steps.fanout import merge_step

    report = merge_step([a.path for a in ingested], [a.path for a in counts], config_json, feature_map.path,
                        parent_run_id)
    for key in ("read", "written", "quarantined"):
        metrics.log_metric(f"rows_{key}", report[key])
    items = []
    for a in ingested:
        with open(os.path.join(a.path, "report.json")) as f:
            part = json.load(f)["part"]
        items.append({"index": part["index"], "uri": part["uri"], "ingested_uri": a.uri,
                      "parent_run_id": parent_run_id})  # see plan_inputs: loop tasks take their parameters from it
    return sorted(items, key=lambda item: item["index"])
