"""One checkpoint loader for every command: a loadable torch file that is not a deeplight checkpoint is refused
with one clear error, never a KeyError/IndexError traceback (issue 18, item 7)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import write_hashed_dataset
from deeplight.cli.main import main


@pytest.mark.parametrize("content", [{"a": 1}, torch.zeros(3), [1, 2], {"spec": {}, "model": {}, "config": "{}"}],
                         ids=["dict", "tensor", "list", "empty-spec"])
def test_commands_refuse_files_that_are_not_deeplight_checkpoints(tmp_path: Path, capsys, content):
    path, data = tmp_path / "x.pt", write_hashed_dataset(tmp_path / "hashed", rows=300)
    torch.save(content, path)
    for argv in (["prune", "--dense", str(path), "--data", str(data), "--out", str(tmp_path / "p"), "--no-mlflow"],
                 ["compact", "--checkpoint", str(path), "--out", str(tmp_path / "c")],
                 ["evaluate", "--model", str(path), "--data", str(data), "--out", str(tmp_path / "e.json"),
                  "--no-mlflow"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"{path}: not a deeplight checkpoint" in err and "Traceback" not in err, (argv, err)
