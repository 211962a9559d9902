"""The per-file data steps of the fan-out pipeline (pipelines/fanout_pipeline.py): plan -> [ingest + count one
file] x N -> merge counts into one feature map -> [apply it to one file] x N -> gather one hashed dataset.

Same output as `ingest_step` + `hash_step` of deeplight.steps.pipeline on all files at once (row for row, id
for id, the feature map fingerprint; tests/test_fanout.py): each file knows the global index of its first row
(counted by `plan_step`), so its rows get the splits one ingest would give them; counts are summed before
min_count is applied; the gathered splits keep the files' order. MLflow: child runs `ingest` (the merged
report, logged by `merge_step`) and `hash_features` (`gather_step`), as in the one-process pipeline. Without KFP:

    from deeplight.steps import fanout
    items = fanout.plan_step(["s3://bucket/day_0/"], cfg_json, parent)       # one item per file
    for i, item in enumerate(items):
        fanout.ingest_file_step(item, cfg_json, f"out/ingested-{i}", f"out/counts-{i}", parent)
    fanout.merge_step([f"out/ingested-{i}" ...], [f"out/counts-{i}" ...], cfg_json, "out/feature_map", parent)
    for i ...: fanout.apply_step(f"out/ingested-{i}", "out/feature_map", f"out/hashed-{i}")
    fanout.gather_step([f"out/hashed-{i}" ...], cfg_json, "out/hashed", parent)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deeplight.base.errors import DeeplightError
from deeplight.base.config import Config
from deeplight.steps.pipeline import _config as _config_from_json
from deeplight.steps.pipeline import _tracker, step

FEATURE_MAP = "feature_map.json"


def _config(config_json: str | dict) -> Config:
    """The run's Config. Inside a ParallelFor, KFP's local runner hands a JSON string parameter over parsed."""
    return _config_from_json(config_json if isinstance(config_json, str) else json.dumps(config_json))


def plan_step(input_uris: list[str], config_json: str, parent_run_id: str) -> list[dict[str, Any]]:
    """One work item per input file (prefixes listed), with the global index of its first row."""
    from deeplight.data.ingest import plan_files

    with step("plan", parent_run_id):
        if not input_uris:
            raise DeeplightError("ingest: no input files given")
        return plan_files(_config(config_json).data.dataset, list(input_uris))


def ingest_file_step(item: dict[str, Any], config_json: str, ingested_dir: str, counts_dir: str,
                     parent_run_id: str) -> dict[str, Any]:
    """Ingest one file of the plan and count its train split's keys (no MLflow run: `merge_step` logs the
    merged report once)."""
    from deeplight.base.allocators import tune_allocators
    from deeplight.data.hashing import write_value_counts
    from deeplight.data.ingest import ingest_file

    tune_allocators()
    with step(f"ingest {item.get('uri')}", parent_run_id):
        cfg = _config(config_json)
        report = ingest_file(cfg.data.dataset, item, ingested_dir, split=tuple(cfg.data.split),
                             split_mode=cfg.data.split_mode, seed=cfg.data.seed)
        if cfg.features.min_count is not None:  # hashing into buckets needs no counts
            write_value_counts(ingested_dir, counts_dir)
        else:
            Path(counts_dir).mkdir(parents=True, exist_ok=True)
        return report


def merge_step(ingested_dirs: list[str], counts_dirs: list[str], config_json: str, feature_map_dir: str,
               parent_run_id: str) -> dict[str, Any]:
    """The merged ingest report and quarantine (child run `ingest`) and the one feature map fitted on the summed
    counts (FEATURE_MAP in feature_map_dir). Returns the merged report."""
    from deeplight.base.files import read_json, write_json
    from deeplight.data.hashing import feature_map_from_counts
    from deeplight.data.ingest import merge_reports

    with step("ingest", parent_run_id):
        cfg = _config(config_json)
        parts = sorted(((read_json(Path(d) / "report.json"), Path(d)) for d in ingested_dirs),
                       key=lambda p: int(p[0]["part"]["index"]))  # file order
        report = merge_reports([r for r, _ in parts])
        out = Path(feature_map_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "report.json", report)
        with open(out / "quarantine.jsonl", "w") as q:  # file order, each file's lines in order: as one ingest
            for _, d in parts:
                q.write((d / "quarantine.jsonl").read_text())
        with _tracker(parent_run_id, "ingest").run("ingest") as log:
            log.log_params({"dataset": cfg.data.dataset, "inputs": ",".join(r["part"]["uri"] for r, _ in parts),
                            "split": ",".join(map(str, cfg.data.split)), "split_mode": cfg.data.split_mode,
                            "seed": cfg.data.seed, "files": len(parts)})
            log.log_metrics({"rows_read": report["read"], "rows_written": report["written"],
                             "rows_quarantined": report["quarantined"],
                             **{f"rows_{k}": v for k, v in report["splits"].items()}})
            log.log_artifact(out / "report.json")
    with step("merge_counts", parent_run_id):
        if cfg.features.buckets is not None:
            from deeplight.data.feature_map import FeatureMap

            fmap = FeatureMap.hashed(cfg.data.dataset, cfg.features.buckets)
        else:
            fmap = feature_map_from_counts(list(counts_dirs), min_count=cfg.features.min_count)
        fmap.save(out / FEATURE_MAP)
        return report


def apply_step(ingested_dir: str, feature_map_dir: str, out_dir: str, parent_run_id: str = "") -> dict[str, Any]:
    """Write one file's feature ids with the merged feature map."""
    from deeplight.data.feature_map import FeatureMap
    from deeplight.data.hashing import apply_feature_map_to_part

    with step("apply_features", parent_run_id):
        fmap = FeatureMap.load(Path(feature_map_dir) / FEATURE_MAP)
        return apply_feature_map_to_part(fmap, ingested_dir, out_dir)


def gather_step(part_dirs: list[str], config_json: str, out_dir: str, parent_run_id: str) -> dict[str, Any]:
    """One hashed dataset from the per-file ones; child run `hash_features` (as `hash_step`)."""
    from deeplight.data.hashing import gather_hashed
    from deeplight.ops.tracking import client, log_splits

    with step("hash_features", parent_run_id):
        cfg = _config(config_json)
        with _tracker(parent_run_id, "hash_features").run("hash_features") as log:
            log.log_params({"features.min_count": cfg.features.min_count, "features.buckets": cfg.features.buckets,
                            "files": len(part_dirs)})
            manifest = gather_hashed(list(part_dirs), out_dir)
            log.log_metrics({"fields": len(manifest["field_sizes"]), "total_ids": sum(manifest["field_sizes"]),
                             **{f"rows_{k}": v for k, v in manifest["rows"].items()}})
            log.set_tags({"feature_map_fingerprint": manifest["feature_map_fingerprint"]})
            log.log_artifact(Path(out_dir) / "manifest.json")
            log_splits(log.client, log.run_id, out_dir)
        if parent_run_id:
            log_splits(client(), parent_run_id, out_dir)
        return json.loads(json.dumps(manifest))
