"""Row-wise sparse updates for embedding tables: a step reads and writes only the rows its batch touched.

    from deeplight.model.sparse_optim import LazyAdam, SplitOptimizer
    opt = SplitOptimizer(torch.optim.Adam(dense_params, lr=1e-3, fused=True),
                         LazyAdam(embedding_weights, lr=1e-3, weight_decay=1e-4))
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

Dense Adam updates all ~11M embedding entries (and their two moments) every step although a batch of 2048 rows
touches at most 2048 x 39 rows: that full-table pass dominated a training step. `LazyAdam` is Adam applied to
the touched rows only (TensorFlow's LazyAdam, torch's SparseAdam): an untouched row's weights and moments stay
as they were instead of decaying. Weight decay is L2 added to the gradient of the touched rows only (the usual
lazy choice, as in TorchRec's fused embedding optimisers): a row that no batch touches is not shrunk.

Pruning stays sound: the Pruner's gradient hook masks the sparse gradient's values, and it zeroes the moments
`exp_avg` / `exp_avg_sq` (full-size, as in Adam) of pruned entries, so a pruned entry gets update 0 / (0 + eps) = 0
and L2 of a zero weight is zero: nothing regrows it.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

EMBEDDING_OPTIMIZERS = ("dense_adam", "sparse_adam")


class LazyAdam(torch.optim.Optimizer):
    """Adam with L2 weight decay for parameters whose gradients are sparse COO tensors over rows (nn.Embedding
    with sparse=True); each step updates only the gradient's rows. Bias correction counts this parameter's steps.

        >>> import torch
        >>> emb = torch.nn.Embedding(5, 2, sparse=True)
        >>> before = emb.weight.detach().clone()
        >>> opt = LazyAdam(emb.parameters(), lr=0.1)
        >>> emb(torch.tensor([1, 3])).sum().backward(); opt.step()
        >>> sorted((emb.weight != before).any(1).nonzero().flatten().tolist())
        [1, 3]
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # noqa: ARG002 (the Optimizer interface)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise TypeError("LazyAdam wants sparse gradients (nn.Embedding(sparse=True)); "
                                    "use torch.optim.Adam for dense parameters")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                rows, g = sum_rows(p.grad)
                if group["weight_decay"]:
                    g = g.add(p[rows], alpha=group["weight_decay"])
                m = state["exp_avg"][rows].mul_(beta1).add_(g, alpha=1 - beta1)
                v = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["exp_avg"][rows] = m
                state["exp_avg_sq"][rows] = v
                denom = (v / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                p.index_add_(0, rows, m.div_(denom), alpha=-group["lr"] / (1 - beta1 ** t))


def sum_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, summed values) of a sparse row gradient, each row once; ~2x faster than `coalesce()` on CPU."""
    if grad.is_coalesced():
        return grad.indices()[0], grad.values()
    # _indices()/_values(): the raw entries of an uncoalesced tensor (indices() would refuse them)
    rows, inverse = torch.unique(grad._indices()[0], return_inverse=True)
    values = grad._values()
    return rows, values.new_zeros((len(rows), *values.shape[1:])).index_add_(0, inverse, values)


class SplitOptimizer:
    """Two optimisers behind one optimiser's interface: `dense` for ordinary parameters, `sparse` for embedding
    tables. `state` is both optimisers' per-parameter state (the Pruner zeroes moments through it)."""

    def __init__(self, dense: torch.optim.Optimizer, sparse: torch.optim.Optimizer):
        self.dense, self.sparse = dense, sparse

    @property
    def state(self) -> dict[torch.Tensor, dict[str, Any]]:
        # A new dict of the same per-parameter state dicts (edits in place reach the optimisers). Not a ChainMap:
        # the optimisers' states are defaultdicts, which would answer {} for the other optimiser's parameters.
        return {**self.dense.state, **self.sparse.state}

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [*self.dense.param_groups, *self.sparse.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none=set_to_none)
        self.sparse.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.dense.step()
        self.sparse.step()

    def state_dict(self) -> dict[str, Any]:
        return {"dense": self.dense.state_dict(), "sparse": self.sparse.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dense.load_state_dict(state["dense"])
        self.sparse.load_state_dict(state["sparse"])


def embedding_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights of every nn.Embedding in `model` (tables whose rows a batch touches sparsely)."""
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]


def make_embeddings_sparse(model: torch.nn.Module) -> None:
    """Switch every nn.Embedding to sparse gradients (backward only: the forward and the weights are unchanged,
    so checkpoints, export and serving see the same model)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding):
            m.sparse = True
