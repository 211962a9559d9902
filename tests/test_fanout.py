"""Per-file data steps (issue 20, item 3): the fan-out gives the hashed dataset of one ingest + hash of all files.

- Library level (fast): 4 synthetic Criteo files, some bad lines in them, through plan_files -> ingest_file +
  write_value_counts per file (in a shuffled order: no file's result may depend on which ran first) ->
  feature_map_from_counts -> apply_feature_map_to_part per file -> gather_hashed, against `ingest` + `hash_dataset`
  of the same 4 files and of their concatenation: every split row for row, id for id, the feature map and its
  fingerprint, the merged report and quarantine; random and sequential splits; an s3:// prefix served by moto.
- Through the real local runner (kfp.local.SubprocessRunner): the fan-out pipeline on the 4 files, its gathered
  hashed dataset against the one-process steps, and the same MLflow child runs as the one-process pipeline.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deeplight.base.errors import DeeplightError
from deeplight.base.files import read_json
from deeplight.data.feature_map import FeatureMap
from deeplight.data.hashing import (apply_feature_map_to_part, feature_map_from_counts, gather_hashed, hash_dataset,
                                    write_value_counts)
from deeplight.data.ingest import _ingest, ingest, ingest_file, merge_reports, plan_files
from deeplight.data.synth import synthesize

FILES = 4
ROWS = 700  # per file
SPLITS = ("train", "valid", "test")
TINY = {"block_size": 4096, "part_rows": 300, "row_group_rows": 128}  # many blocks, parts and row groups per file


@pytest.fixture(scope="module")
def raw_files(tmp_path_factory) -> list[str]:
    """4 synthetic Criteo files of different seeds, each with two bad lines (quarantined, named by file + line)."""
    root = tmp_path_factory.mktemp("raw")
    paths = []
    for i in range(FILES):
        path = root / f"day_{i}.txt"
        synthesize("criteo", rows=ROWS, seed=10 + i, out=str(path))
        lines = path.read_text().splitlines(keepends=True)
        lines.insert(5 + i, "not\ta criteo row\n")
        lines.insert(300 + i, lines[300 + i].replace("\t", "\tx", 1))  # non-integer I1
        path.write_text("".join(lines))
        paths.append(str(path))
    return paths


def split_tables(hashed: Path) -> dict[str, pa.Table]:
    return {s: pa.concat_tables([pq.read_table(p) for p in sorted((hashed / s).glob("*.parquet"))]) for s in SPLITS}


def one_process(files: list[str], out: Path, split_mode: str = "random", min_count: int = 2) -> SimpleNamespace:
    report = _ingest("criteo", files, str(out / "ingested"), split=(0.8, 0.1, 0.1), split_mode=split_mode, seed=3,
                     **TINY)
    manifest = hash_dataset(str(out / "ingested"), str(out / "hashed"), min_count=min_count)
    return SimpleNamespace(report=report, manifest=manifest, root=out)


def fan_out(files: list[str], out: Path, split_mode: str = "random", min_count: int = 2) -> SimpleNamespace:
    items = plan_files("criteo", files, block_size=TINY["block_size"])
    order = list(range(len(items)))
    random.Random(1).shuffle(order)  # the workers finish in any order
    reports = {}
    for i in order:
        reports[i] = ingest_file("criteo", items[i], str(out / f"ingested-{i}"), split=(0.8, 0.1, 0.1),
                                 split_mode=split_mode, seed=3, **TINY)
        write_value_counts(str(out / f"ingested-{i}"), str(out / f"counts-{i}"))
    fmap = feature_map_from_counts([str(out / f"counts-{i}") for i in order], min_count=min_count)
    for i in order:
        apply_feature_map_to_part(fmap, str(out / f"ingested-{i}"), str(out / f"hashed-{i}"))
    manifest = gather_hashed([str(out / f"hashed-{i}") for i in order], str(out / "hashed"))
    return SimpleNamespace(report=merge_reports(list(reports.values())), manifest=manifest, root=out, items=items,
                           quarantine="".join((out / f"ingested-{i}" / "quarantine.jsonl").read_text()
                                              for i in range(len(items))))


def assert_same_hashed(a: Path, b: Path) -> None:
    ta, tb = split_tables(a), split_tables(b)
    for s in SPLITS:
        assert ta[s].num_rows > 0 and ta[s].equals(tb[s]), s  # row for row, id for id, labels too
    fa, fb = FeatureMap.load(a / "feature_map.json"), FeatureMap.load(b / "feature_map.json")
    assert fa.to_dict() == fb.to_dict() and fa.fingerprint() == fb.fingerprint()
    ma, mb = read_json(a / "manifest.json"), read_json(b / "manifest.json")
    for key in ("dataset", "mode", "field_names", "field_sizes", "rows", "feature_map_fingerprint"):
        assert ma[key] == mb[key], key


@pytest.mark.parametrize("split_mode", ["random", "sequential"])
def test_per_file_steps_give_the_one_process_dataset(raw_files, tmp_path, split_mode):
    single = one_process(raw_files, tmp_path / "single", split_mode)
    fanned = fan_out(raw_files, tmp_path / "fanned", split_mode)
    assert_same_hashed(single.root / "hashed", fanned.root / "hashed")
    assert fanned.report == single.report  # counts per file and split, reasons
    assert fanned.quarantine == (single.root / "ingested" / "quarantine.jsonl").read_text()
    assert single.report["quarantined"] == 2 * FILES
    q = [json.loads(line) for line in fanned.quarantine.splitlines()]
    assert [(Path(r["file"]).name, r["line"]) for r in q[:2]] == [("day_0.txt", 6), ("day_0.txt", 301)]
    # the gathered splits keep the files' order: file 0's parts first
    assert sorted(p.name for p in (fanned.root / "hashed" / "train").glob("*.parquet"))[0].startswith("part-00000-")
    assert [it["first_row"] for it in fanned.items] == [0, ROWS + 2, 2 * (ROWS + 2), 3 * (ROWS + 2)]


def test_the_concatenated_file_gives_the_same_ids(raw_files, tmp_path):
    """Criteo has no header: one file holding the 4 files' lines splits and hashes exactly as the 4 files."""
    whole = tmp_path / "all.txt"
    whole.write_text("".join(Path(f).read_text() for f in raw_files))
    single = one_process([str(whole)], tmp_path / "single")
    fanned = fan_out(raw_files, tmp_path / "fanned")
    assert_same_hashed(single.root / "hashed", fanned.root / "hashed")


def test_min_count_applies_to_the_summed_counts(raw_files, tmp_path):
    """A value seen once in each of two files reaches min_count 2 only after the merge: a per-file threshold would
    drop it."""
    fanned = fan_out(raw_files[:2], tmp_path / "fanned", min_count=2)
    per_file = [FeatureMap.load(tmp_path / "fanned" / f"hashed-{i}" / "feature_map.json") for i in range(2)]
    merged = FeatureMap.load(fanned.root / "hashed" / "feature_map.json")
    assert per_file[0].fingerprint() == merged.fingerprint()  # every file was mapped with the merged map
    one_file_maps = []
    for i in range(2):
        ingested = fanned.root / f"ingested-{i}"
        one_file_maps.append(feature_map_from_counts([str(tmp_path / "fanned" / f"counts-{i}")], min_count=2))
        assert (ingested / "report.json").is_file()
    total = sum(merged.field_sizes)
    assert total > max(sum(m.field_sizes) for m in one_file_maps)


def test_an_s3_prefix_is_listed_in_name_order(raw_files, tmp_path, moto_s3):
    s3 = moto_s3
    s3.create_bucket(Bucket="raw")
    for f in reversed(raw_files):
        s3.upload_file(f, "raw", f"criteo/days/{Path(f).name}")
    s3.put_object(Bucket="raw", Key="criteo/days/.hidden", Body=b"x")
    items = plan_files("criteo", ["s3://raw/criteo/days/"])
    assert [it["uri"] for it in items] == [f"s3://raw/criteo/days/day_{i}.txt" for i in range(FILES)]
    report = ingest_file("criteo", items[1], str(tmp_path / "one"))
    assert report["read"] == ROWS + 2 and report["part"]["first_row"] == ROWS + 2
    with pytest.raises(DeeplightError, match=r"s3://raw/nothing/: (cannot list|no files under this prefix)"):
        plan_files("criteo", ["s3://raw/nothing/"])


def test_a_file_that_changed_since_it_was_counted_is_an_error(raw_files, tmp_path):
    item = plan_files("criteo", raw_files[:1])[0]
    with pytest.raises(DeeplightError, match=r"day_0.txt: changed since it was counted \(701 rows counted"):
        ingest_file("criteo", {**item, "rows": ROWS + 1}, str(tmp_path / "x"))
    with pytest.raises(DeeplightError, match="not a plan_files item"):
        ingest_file("criteo", {"uri": raw_files[0]}, str(tmp_path / "y"))


def test_gather_refuses_parts_mapped_with_different_feature_maps(raw_files, tmp_path):
    items = plan_files("criteo", raw_files[:2])
    for i, item in enumerate(items):
        ingest_file("criteo", item, str(tmp_path / f"ingested-{i}"))
        write_value_counts(str(tmp_path / f"ingested-{i}"), str(tmp_path / f"counts-{i}"))
        fmap = feature_map_from_counts([str(tmp_path / f"counts-{i}")], min_count=1)  # per file: wrong
        apply_feature_map_to_part(fmap, str(tmp_path / f"ingested-{i}"), str(tmp_path / f"hashed-{i}"))
    with pytest.raises(DeeplightError, match="different feature maps"):
        gather_hashed([str(tmp_path / f"hashed-{i}") for i in range(2)], str(tmp_path / "hashed"))


# --- through the real local runner ------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_fanout_pipeline_gives_the_one_process_dataset(raw_files, tmp_path, monkeypatch):
    pytest.importorskip("kfp")
    from mlflow.tracking import MlflowClient

    from deeplight.cli import pipeline as pipeline_cli

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DEEPLIGHT_MLRUNS", str(tmp_path / "mlruns"))
    args = {"input_uris": raw_files, "epochs": 1, "min_count": 2, "seed": 3, "ramp_epochs": 1.0,
            "finetune_epochs": 1, "run_name": "fanned", "model_name": "ctr-fanout-test",
            "config_overrides": json.dumps({"model.dnn": [8], "train.batch_size": 512})}
    summary = pipeline_cli.run_local(args, pipeline_root=tmp_path / "kfp", pipeline="fanout", verbose=False)
    gathered = list((tmp_path / "kfp").glob("*/gather-hashed/hashed"))
    assert len(gathered) == 1
    ingest("criteo", raw_files, str(tmp_path / "ingested"), seed=3)  # today's one-process steps, same settings
    hash_dataset(str(tmp_path / "ingested"), str(tmp_path / "hashed"), min_count=2)
    assert_same_hashed(tmp_path / "hashed", gathered[0])
    # 4 ingest tasks and 4 id tasks ran, one per file
    assert len(list((tmp_path / "kfp").glob("*/for-loop-*-iteration-*/ingest-file"))) == FILES
    assert len(list((tmp_path / "kfp").glob("*/for-loop-*-iteration-*/apply-features"))) == FILES
    # the same MLflow runs as the one-process pipeline
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    exp = client.get_experiment_by_name("deeplight").experiment_id
    steps = {pipeline_cli.step_of(r) for r in client.search_runs([exp], f"tags.`mlflow.parentRunId` = "
                                                                         f"'{parent.info.run_id}'")}
    assert steps == {"ingest", "hash_features", "train", "prune", "evaluate-dense", "evaluate-pruned", "register"}
    runs = {pipeline_cli.step_of(r): r for r in client.search_runs([exp], f"tags.`mlflow.parentRunId` = "
                                                                          f"'{parent.info.run_id}'")}
    assert runs["ingest"].data.metrics["rows_written"] == FILES * ROWS
    assert runs["hash_features"].data.tags["feature_map_fingerprint"] == \
        FeatureMap.load(tmp_path / "hashed" / "feature_map.json").fingerprint()


def test_the_committed_fanout_yaml_is_current_and_fans_out(tmp_path):
    pytest.importorskip("kfp")
    import yaml

    from deeplight.cli import pipeline as pipeline_cli

    fresh = pipeline_cli.compile_pipeline(tmp_path / "fanout_pipeline.yaml", pipeline="fanout")
    committed = Path(__file__).resolve().parents[1] / "pipelines" / "fanout_pipeline.yaml"
    assert committed.read_text() == fresh.read_text(), (
        "pipelines/fanout_pipeline.yaml is out of date: run `deeplight pipeline compile --pipeline fanout`")
    spec = yaml.safe_load(fresh.read_text())
    assert spec["pipelineInfo"]["name"] == "deeplight-fanout"
    body = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    loops = [t for t in body.values() if "parameterIterator" in t]  # dsl.ParallelFor
    bodies = {frozenset(spec["components"][t["componentRef"]["name"]]["dag"]["tasks"]) for t in loops}
    assert bodies == {frozenset({"ingest-file"}), frozenset({"importer", "apply-features"})}
    assert {"plan-inputs", "merge-counts", "gather-hashed", "train"} <= set(body)
    assert "ingest" not in body and "hash-features" not in body
    assert body["train"]["inputs"]["artifacts"]["hashed"]["taskOutputArtifact"]["producerTask"] == "gather-hashed"
