"""Training: learns, deterministic, resumes after kill -9 with identical metrics, safe checkpoints, clear errors."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deeplight.model import checkpoint
from deeplight.base.config import Config
from deeplight.data.loader import SplitLoader
from deeplight.base.errors import DeeplightError
from deeplight.model.train import distillation_loss, train, train_batch_size

from conftest import write_hashed_dataset

SMALL = {"model.dnn": (32, 32), "train.batch_size": 256, "train.epochs": 3, "train.threads": 1,
         "train.checkpoint_every": 7}


def without_speed(history: list[dict]) -> list[dict]:
    """Epoch history minus the wall-clock throughput, which legitimately differs between runs."""
    return [{k: v for k, v in h.items() if k != "samples_per_s"} for h in history]


def small_cfg(**over) -> Config:
    return Config().replace(**{**SMALL, **over})


def test_loader_streams_every_row_once_and_shuffles_by_epoch(toy_hashed: Path):
    loader = SplitLoader(toy_hashed, "train", batch_size=1000, shuffle=True, seed=3, buffer_rows=4000,
                         read_rows=1500)
    seen = [ids for ids, _ in loader.epoch(0)]
    flat0 = torch.cat(seen)
    assert len(flat0) == loader.rows == 14_000
    plain = torch.cat([ids for ids, _ in SplitLoader(toy_hashed, "train", batch_size=1000).epoch(0)])
    # Same multiset of rows, different order; the order is a function of (seed, epoch) only.
    assert sorted(map(tuple, flat0.tolist())) == sorted(map(tuple, plain.tolist()))
    assert not torch.equal(flat0, plain)
    assert torch.equal(flat0, torch.cat([ids for ids, _ in loader.epoch(0)]))
    assert not torch.equal(flat0, torch.cat([ids for ids, _ in loader.epoch(1)]))
    skipped = torch.cat([ids for ids, _ in loader.epoch(0, skip_batches=4)])
    assert torch.equal(skipped, flat0[4000:])


def test_fwfm_learns_and_reports_test_only_at_the_end(toy_hashed: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DEEPLIGHT_PROGRESS_SECONDS", "0")  # off a terminal: a progress line per step, then per epoch
    result = train(toy_hashed, tmp_path / "out", small_cfg(**{"model.kind": "fwfm"}))
    err = capsys.readouterr().err
    epochs = [line for line in err.splitlines() if re.match(r"epoch \d+/\d+ done: valid AUC 0\.\d{4}, logloss", line)]
    assert len(epochs) == len(result["history"]) and re.search(r"^epoch 1/\d+: .* samples/s", err, re.M), err[-1500:]
    assert result["valid"]["auc"] > 0.7
    assert set(result["test"]) >= {"auc", "logloss", "rows", "mean_pred", "observed_ctr"}
    assert result["test"]["rows"] == 3000
    assert all("test_auc" not in h for h in result["history"])  # selection never saw the test split
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["best_epoch"] == result["best_epoch"]
    assert (tmp_path / "out" / "learning_curve.png").stat().st_size > 1000


def test_deepfwfm_beats_lr_on_planted_interaction(toy_hashed: Path, tmp_path: Path):
    deep = train(toy_hashed, tmp_path / "deep", small_cfg())
    lr = train(toy_hashed, tmp_path / "lr", small_cfg(**{"model.kind": "lr"}))
    assert deep["test"]["auc"] > lr["test"]["auc"] + 0.01


def test_training_is_deterministic(toy_hashed: Path, tmp_path: Path):
    a = train(toy_hashed, tmp_path / "a", small_cfg(**{"train.epochs": 2}))
    b = train(toy_hashed, tmp_path / "b", small_cfg(**{"train.epochs": 2}))
    assert without_speed(a["history"]) == without_speed(b["history"])
    assert a["valid"] == b["valid"] and a["test"] == b["test"]


def _run_train_cli(data: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "deeplight.cli", "train", "--data", str(data), "--out", str(out), "--no-mlflow",
           "--epochs", "3", "--batch-size", "64", "--checkpoint-every", "5", "--threads", "1", "--model", "fwfm"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})


def test_resume_after_kill_gives_identical_metrics(tmp_path: Path):
    data = write_hashed_dataset(tmp_path / "hashed", rows=40_000)
    reference = _run_train_cli(data, tmp_path / "ref")
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())

    out = tmp_path / "killed"
    kills = 0
    for wait_for_step in (12, 500):  # once mid-epoch 1, once in a later epoch
        proc = _run_train_cli(data, out)
        deadline = time.time() + 120
        while time.time() < deadline:
            if (out / "last.pt").exists():
                try:
                    step = checkpoint.load(out / "last.pt")["progress"]["step"]
                except DeeplightError:
                    step = -1  # caught between write and rename is impossible; a partial file is never visible
                if step >= wait_for_step:
                    break
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1
    resumed = _run_train_cli(data, out)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    got = json.loads((out / "results.json").read_text())
    assert got["valid"] == ref["valid"]
    assert got["test"] == ref["test"]
    assert got["best_epoch"] == ref["best_epoch"]
    assert without_speed(got["history"]) == without_speed(ref["history"])


def test_checkpoints_load_without_running_code(toy_hashed: Path, tmp_path: Path):
    train(toy_hashed, tmp_path / "out", small_cfg(**{"train.epochs": 1}))
    best = checkpoint.load(tmp_path / "out" / "best.pt")
    assert best["spec"]["kind"] == "deepfwfm"

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(DeeplightError, match="evil.pt"):
        checkpoint.load(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_bad_inputs_fail_clearly(toy_hashed: Path, tmp_path: Path):
    with pytest.raises(DeeplightError, match="not a hashed dataset"):
        train(tmp_path / "nothing", tmp_path / "o1", small_cfg())
    broken = write_hashed_dataset(tmp_path / "broken")
    for f in (broken / "valid").iterdir():
        f.unlink()
    (broken / "valid").rmdir()
    with pytest.raises(DeeplightError, match="missing split 'valid'"):
        train(broken, tmp_path / "o2", small_cfg())
    mismatch = write_hashed_dataset(tmp_path / "mismatch")
    manifest = json.loads((mismatch / "manifest.json").read_text())
    manifest["field_names"][2] = "C99"
    (mismatch / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DeeplightError, match="C99"):
        train(mismatch, tmp_path / "o3", small_cfg())
    train(toy_hashed, tmp_path / "o4", small_cfg(**{"train.epochs": 1}))
    with pytest.raises(DeeplightError, match="different config"):
        train(toy_hashed, tmp_path / "o4", small_cfg(**{"train.epochs": 1, "train.lr": 0.01}))


def test_dnn_gets_its_own_weight_decay():
    from deeplight.model.deepfwfm import DeepFwFM
    from deeplight.model.train import param_groups

    model = DeepFwFM([5, 7, 3], dnn=(8,))
    tc = Config().replace(**{"train.weight_decay": 1e-4, "train.dnn_weight_decay": 1e-2}).train
    groups = param_groups(model, tc)
    by_id = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert len(by_id) == len(list(model.parameters()))  # every parameter exactly once
    for name, p in model.named_parameters():
        assert by_id[id(p)] == (1e-2 if name.startswith("dnn.") else 1e-4), name
    import dataclasses

    same = param_groups(model, dataclasses.replace(Config().train, weight_decay=3e-4, dnn_weight_decay=None))
    assert {g["weight_decay"] for g in same} == {3e-4}  # unset: the DNN follows weight_decay
    assert len(param_groups(DeepFwFM([5, 7, 3], kind="fwfm"), tc)) == 1  # no DNN, no empty group


def test_small_train_splits_get_a_smaller_batch():
    tc = Config().train
    assert tc.batch_size == 2048 and tc.min_steps_per_epoch == 32
    assert train_batch_size(8_000, tc) == 250  # 32 steps per epoch, not 4
    assert train_batch_size(65_536, tc) == 2048 and train_batch_size(1_000_000, tc) == 2048  # large data: as set
    assert train_batch_size(10, tc) == 1
    off = Config().replace(**{"train.min_steps_per_epoch": 0}).train
    assert train_batch_size(8_000, off) == 2048


def test_training_uses_the_small_data_batch(toy_hashed: Path, tmp_path: Path):
    # 14,000 train rows, batch 2048 asked, at least 28 steps per epoch wanted: 500 rows per batch.
    result = train(toy_hashed, tmp_path / "out", small_cfg(**{"model.kind": "lr", "train.epochs": 1,
                                                             "train.batch_size": 2048,
                                                             "train.min_steps_per_epoch": 28}))
    assert result["batch_size"] == 500 and result["steps"] == 28


def test_distillation_loss_adds_the_weighted_soft_target_term():
    logits = torch.tensor([0.0, 2.0, -1.0])
    labels = torch.tensor([1.0, 0.0, 1.0])
    teacher = torch.tensor([0.5, 0.8, 0.3])
    plain, label = distillation_loss(logits, labels, None, 1.0)
    assert torch.equal(plain, label)
    total, label2 = distillation_loss(logits, labels, teacher, 0.5)
    soft = -(teacher * torch.log(torch.sigmoid(logits)) + (1 - teacher) * torch.log(1 - torch.sigmoid(logits)))
    assert torch.equal(label2, label)
    assert float(total) == pytest.approx(float(label + 0.5 * soft.mean()), rel=1e-6)
    # Toward the teacher: its own logits have the smallest soft-target loss.
    t_total, t_label = distillation_loss(torch.logit(teacher), labels, teacher, 1.0)
    assert float(t_total - t_label) < float(soft.mean())
