"""`train.device` (`--device auto|cpu|cuda`): which torch device trains and prunes. The CPU path runs here; the CUDA
tests run where torch sees a GPU (skipped otherwise), and check that a model trained and pruned on the GPU is read
back on the CPU, and that a pruning run resumes there with its masks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deeplight.base.config import Config
from deeplight.base.errors import DeeplightError
from deeplight.cli.main import build_parser
from deeplight.cli.options import config_from
from deeplight.model import checkpoint
from deeplight.model.device import resolve, to_device
from deeplight.model.prune import prune
from deeplight.model.train import Trainer, train
from deeplight.model.deepfwfm import DeepFwFM

SMALL = {"model.dnn": (16, 16), "train.batch_size": 512, "train.epochs": 2, "train.threads": 1,
         "prune.ramp_epochs": 1.0, "prune.finetune_epochs": 1, "prune.min_ramp_steps": 10,
         "prune.min_finetune_steps": 10}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU")
without_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")


def cfg(device: str, **over) -> Config:
    return Config().replace(**{**SMALL, "train.device": device, **over})


def test_auto_picks_the_gpu_only_when_torch_sees_one(monkeypatch):
    assert resolve("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve("auto") == torch.device("cuda")
    assert resolve("AUTO ") == torch.device("cuda")


def test_cuda_without_a_gpu_and_unknown_devices_are_clear_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeeplightError, match="train.device=cuda: torch sees no CUDA GPU"):
        resolve("cuda")
    with pytest.raises(DeeplightError, match="train.device=cuda:1: torch sees no CUDA GPU"):
        resolve("cuda:1")
    with pytest.raises(DeeplightError, match="choose one of auto, cpu, cuda"):
        resolve("tpu")


def test_checkpoint_state_moves_with_its_nesting():
    state = {"masks": {"a": torch.ones(2, dtype=torch.bool)}, "step": 3, "pair": (torch.zeros(1), "x")}
    moved = to_device(state, torch.device("cpu"))
    assert moved["step"] == 3 and moved["pair"][1] == "x" and isinstance(moved["pair"], tuple)
    assert torch.equal(moved["masks"]["a"], state["masks"]["a"])


@pytest.mark.parametrize("command", [["train", "--data", "d", "--out", "o"],
                                     ["prune", "--dense", "d.pt", "--data", "d", "--out", "o"],
                                     ["sweep", "--data", "d", "--out", "o"]])
def test_device_flag_of_train_prune_and_sweep_sets_the_config(command):
    parser = build_parser()
    assert config_from(parser.parse_args(command)).train.device == "auto"
    assert config_from(parser.parse_args(command + ["--device", "cpu"])).train.device == "cpu"
    with pytest.raises(SystemExit):
        parser.parse_args(command + ["--device", "tpu"])


def test_the_trainer_puts_model_and_teacher_on_the_configured_device(toy_hashed: Path, tmp_path: Path):
    model = DeepFwFM.from_config([50, 30, 20, 10, 8, 5], cfg("cpu").model)
    teacher = DeepFwFM.from_config([50, 30, 20, 10, 8, 5], cfg("cpu").model)
    trainer = Trainer(model, toy_hashed, tmp_path / "t", cfg("cpu"), epochs=1, teacher=teacher, distill_weight=1.0)
    assert trainer.device == torch.device("cpu")
    assert {p.device for p in trainer.model.parameters()} == {torch.device("cpu")}
    assert {p.device for p in trainer.teacher.parameters()} == {torch.device("cpu")}


@without_cuda
def test_train_and_prune_with_cuda_on_a_cpu_only_machine_fail_before_any_work(toy_hashed: Path, tmp_path: Path):
    with pytest.raises(DeeplightError, match="torch sees no CUDA GPU"):
        train(toy_hashed, tmp_path / "dense", cfg("cuda"))
    assert not (tmp_path / "dense" / "last.pt").exists()
    dense = train(toy_hashed, tmp_path / "dense", cfg("cpu"))
    with pytest.raises(DeeplightError, match="torch sees no CUDA GPU"):
        prune(dense["checkpoint"], toy_hashed, tmp_path / "pruned", cfg("cuda"))
    assert not (tmp_path / "pruned" / "last.pt").exists()


@without_cuda
def test_cli_device_cuda_without_a_gpu_says_so(toy_hashed: Path, tmp_path: Path):
    done = subprocess.run([sys.executable, "-m", "deeplight", "train", "--data", str(toy_hashed), "--out",
                           str(tmp_path / "o"), "--device", "cuda", "--no-mlflow"], capture_output=True, text=True)
    assert done.returncode != 0
    assert "torch sees no CUDA GPU" in done.stderr and "Traceback" not in done.stderr


@needs_cuda
def test_train_and_prune_on_the_gpu_read_back_on_the_cpu(toy_hashed: Path, tmp_path: Path):
    dense = train(toy_hashed, tmp_path / "dense", cfg("cuda"))
    cpu_dense = train(toy_hashed, tmp_path / "dense-cpu", cfg("cpu"))
    assert abs(dense["valid"]["auc"] - cpu_dense["valid"]["auc"]) < 0.02  # same data and seed, another device
    model, ck = checkpoint.load_model(dense["checkpoint"])
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    pruned = prune(dense["checkpoint"], toy_hashed, tmp_path / "pruned", cfg("cuda"))
    assert pruned["pruning"]["sparsity"]["dnn"] == pytest.approx(0.9, abs=0.01)
    ck = checkpoint.load(pruned["checkpoint"])
    assert all(m.device.type == "cpu" for m in ck["extra"]["masks"].values())


@needs_cuda
def test_a_gpu_pruning_run_resumes_with_its_masks_on_the_gpu(toy_hashed: Path, tmp_path: Path):
    dense = train(toy_hashed, tmp_path / "dense", cfg("cuda"))
    out = tmp_path / "pruned"
    first = prune(dense["checkpoint"], toy_hashed, out, cfg("cuda", **{"train.checkpoint_every": 5}))
    results = json.loads((out / "results.json").read_text())
    (out / "results.json").unlink()
    again = prune(dense["checkpoint"], toy_hashed, out, cfg("cuda", **{"train.checkpoint_every": 5}))
    assert again["valid"]["auc"] == pytest.approx(first["valid"]["auc"]) == pytest.approx(results["valid"]["auc"])
