"""Data-parallel training over torch.distributed ranks, as torchrun and the Kubeflow PyTorchJob start them.

    torchrun --nproc_per_node 2 -m deeplight train --data data/hashed --out out/dense

`world_from_env` joins the process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA; RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT come from the launcher) and is a no-op in one process. Each rank trains on its own
shard of the train split (`deeplight.data.loader.shard_range`) with batch = global batch / world size;
`GradientSync` averages the gradients after every backward pass:

- dense parameters (DNN, field-pair weights, ...): one all-reduce of all of them, flattened;
- embedding tables: only the rows the ranks' batches touched, as (row, values) pairs gathered from every rank
  (`all_gather`), never the full table: 2048 x 39 rows x 10 floats per rank instead of ~10M floats per step.
  A table smaller than that (a small vocabulary, the 1-wide linear term) is all-reduced whole instead, with a
  touched flag per row, whichever sends fewer bytes (every rank decides alike from the gathered row counts).

Every rank then applies the same averaged gradient with the same optimiser, so the weights (and pruning masks,
computed from the weights) stay identical on all ranks without being sent. Rank 0 alone writes checkpoints and
talks to MLflow; it reads `last.pt` on resume and broadcasts it, so other ranks need no shared disk.
"""

from __future__ import annotations

import atexit
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from deeplight.base.errors import DeeplightError
from deeplight.model.sparse_optim import embedding_weights, sum_rows


@dataclass(frozen=True)
class World:
    """This process's place among the ranks; World() is one process on its own."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Whether this process writes checkpoints and tracks to MLflow (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def env_rank() -> int:
    """RANK as the launcher set it (0 without a launcher): lets a command skip MLflow before joining the group."""
    return int(os.environ.get("RANK", "0") or 0)


def world_from_env(device: torch.device) -> tuple[World, torch.device]:
    """(World, device): joins the process group when WORLD_SIZE > 1; a CUDA device becomes cuda:LOCAL_RANK."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return World(), device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise DeeplightError(f"WORLD_SIZE={size} but {var} is not set: start the ranks with torchrun "
                                     "(or a PyTorchJob), which sets RANK, MASTER_ADDR and MASTER_PORT")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_leave)
    return World(dist.get_rank(), dist.get_world_size()), device


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class SyncStats:
    """Bytes this rank put on the wire for gradients, per step, against a dense all-reduce of every gradient."""

    steps: int = 0
    sent_bytes: int = 0
    dense_bytes: int = 0  # what all-reducing every parameter's full gradient would send
    embedding_rows: int = 0  # (row, values) pairs sent for embedding tables
    whole_tables: int = 0  # tables all-reduced whole (smaller than their touched rows)
    last: dict[str, int] = field(default_factory=dict)

    def per_step(self) -> dict[str, float]:
        n = max(self.steps, 1)
        return {"allreduce_bytes_per_step": self.sent_bytes / n, "dense_allreduce_bytes_per_step": self.dense_bytes / n,
                "embedding_rows_per_step": self.embedding_rows / n, "whole_tables_per_step": self.whole_tables / n}


class GradientSync:
    """Average gradients over ranks in place after `backward()`; see the module doc. `densify`: hand the
    embedding tables dense gradients afterwards (for an optimiser that wants them, e.g. fused Adam)."""

    def __init__(self, model: torch.nn.Module, world: World, densify: bool = False):
        self.world, self.densify = world, densify
        tables = {id(p) for p in embedding_weights(model)}
        params = [p for p in model.parameters() if p.requires_grad]
        self.tables = [p for p in params if id(p) in tables]
        self.dense = [p for p in params if id(p) not in tables]
        self.stats = SyncStats()

    def __call__(self) -> None:
        size = self.world.size
        sent = 0
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.dense]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= size
            sent += flat.numel() * flat.element_size()
            offset = 0
            for p, g in zip(self.dense, grads):
                p.grad = flat[offset:offset + g.numel()].view_as(p).clone()
                offset += g.numel()
        rows_sent = 0
        for p in self.tables:
            rows, values = self._local_rows(p)
            counts = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
            dist.all_gather(counts, torch.tensor([len(rows)]))
            n = [int(c.item()) for c in counts]
            row_bytes = p[0].numel() * p.element_size()
            if max(n) * (8 + row_bytes) <= len(p) * (row_bytes + 4):  # an int64 row number + the row's values
                rows, values = self._gather_rows(rows, values, n)
                rows_sent += max(n)
                sent += max(n) * (8 + row_bytes)
                grad = torch.sparse_coo_tensor(rows[None], values / size, p.shape)  # rows repeat across ranks
            else:  # the whole table (+ a touched flag per row) is fewer bytes than the touched rows
                rows, values = self._reduce_whole(p, rows, values)
                self.stats.whole_tables += 1
                sent += len(p) * (row_bytes + 4)
                grad = torch.sparse_coo_tensor(rows[None], values / size, p.shape, is_coalesced=True)
            p.grad = grad.to_dense() if self.densify else grad
        self.stats.steps += 1
        self.stats.sent_bytes += sent
        self.stats.dense_bytes += sum(p.numel() * p.element_size() for p in [*self.dense, *self.tables])
        self.stats.embedding_rows += rows_sent

    @staticmethod
    def _local_rows(p: torch.nn.Parameter) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, summed values) of this rank's sparse gradient of table p, each row once."""
        if p.grad is None:
            return torch.zeros(0, dtype=torch.int64), p.new_zeros((0, *p.shape[1:]))
        if not p.grad.is_sparse:
            raise DeeplightError("data-parallel training needs sparse embedding gradients (nn.Embedding(sparse="
                                 "True)); the Trainer switches them on")
        return sum_rows(p.grad)

    def _gather_rows(self, rows: torch.Tensor, values: torch.Tensor, n: list[int]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's (rows, values), concatenated in rank order; `n`: each rank's count."""
        most = max(n)
        # all_gather wants equal shapes: pad to the largest count, trim after
        padded_rows = torch.zeros(most, dtype=torch.int64)
        padded_rows[:len(rows)] = rows
        padded_values = values.new_zeros((most, *values.shape[1:]))
        padded_values[:len(rows)] = values
        all_rows = [torch.empty_like(padded_rows) for _ in range(self.world.size)]
        all_values = [torch.empty_like(padded_values) for _ in range(self.world.size)]
        dist.all_gather(all_rows, padded_rows)
        dist.all_gather(all_values, padded_values)
        return torch.cat([r[:k] for r, k in zip(all_rows, n)]), torch.cat([v[:k] for v, k in zip(all_values, n)])

    @staticmethod
    def _reduce_whole(p: torch.nn.Parameter, rows: torch.Tensor, values: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The summed gradient of the rows any rank touched, by one all-reduce of the whole table with a touched
        flag per row (so a touched row whose gradient sums to 0 still counts as touched, as in one process)."""
        width = p[0].numel()  # a row's size (1 for a table of scalars), which every gradient row has too
        table = p.new_zeros((len(p), width + 1))
        table[rows, :width] = values.reshape(len(rows), width)
        table[rows, width] = 1
        dist.all_reduce(table)
        touched = table[:, width].nonzero().flatten()
        return touched, table[touched, :width].reshape(len(touched), *p.shape[1:])


def broadcast(obj: Any, world: World) -> Any:
    """Rank 0's `obj` on every rank (pickled; for checkpoints and small state)."""
    if not world.active:
        return obj
    box = [obj if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_parameters(model: torch.nn.Module, world: World) -> None:
    """Rank 0's weights and buffers on every rank (in place)."""
    if world.active:
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)


def gather_arrays(arrays: list[np.ndarray], world: World) -> list[np.ndarray]:
    """Each array concatenated over ranks in rank order (e.g. labels and probabilities of each rank's shard)."""
    if not world.active:
        return arrays
    parts: list[Any] = [None] * world.size
    dist.all_gather_object(parts, arrays)
    return [np.concatenate([p[i] for p in parts]) for i in range(len(arrays))]


def sum_over_ranks(values: list[float], world: World) -> list[float]:
    if not world.active:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def state_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A short hash of tensors' bytes (to check that every rank holds the same weights and masks)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def digests_over_ranks(digest: str, world: World) -> list[str]:
    if not world.active:
        return [digest]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, digest)
    return out
