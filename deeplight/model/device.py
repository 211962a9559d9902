"""Where torch trains and prunes: the setting `train.device` (`--device auto|cpu|cuda` on train, prune and sweep).

    >>> resolve("cpu")
    device(type='cpu')
    >>> resolve("auto").type in ("cpu", "cuda")
    True

`auto` (the default) is the first CUDA GPU when torch sees one, else the CPU; `cuda` (or `cuda:N`) insists on a
GPU and fails with a clear error when there is none, so a pod that asked for a GPU and did not get one does not
silently train on its CPU. Checkpoints are always read back onto the CPU (`checkpoint.load`), whatever device
wrote them: evaluation, compaction and serving run on the CPU.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from deeplight.base.errors import DeeplightError

DEVICES = ("auto", "cpu", "cuda")


def resolve(name: str) -> torch.device:
    """The torch device named by a `train.device` setting."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", name):
        if not torch.cuda.is_available():
            raise DeeplightError(f"train.device={name}: torch sees no CUDA GPU (torch {torch.__version__}, "
                                 f"built for CUDA {torch.version.cuda or 'none: a CPU-only build'}); use "
                                 "--device auto or cpu")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise DeeplightError(f"train.device={name}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device(name)
    raise DeeplightError(f"train.device={name!r}: choose one of {', '.join(DEVICES)} (or cuda:N)")


def to_device(obj: Any, device: torch.device) -> Any:
    """`obj` with every tensor in it (nested dicts, lists, tuples) on `device`: checkpoint state read on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj
