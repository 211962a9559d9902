"""Row-wise sparse embedding updates (train.embedding_optimizer=sparse_adam): Adam on touched rows, L2 on touched
rows only, resume restores the optimiser state exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deeplight.base.config import Config
from deeplight.base.errors import DeeplightError
from deeplight.model import checkpoint
from deeplight.model.deepfwfm import DeepFwFM
from deeplight.model.sparse_optim import LazyAdam, SplitOptimizer
from deeplight.model.train import make_optimizer, train

from conftest import write_hashed_dataset

SPARSE = {"model.dnn": (32, 32), "train.batch_size": 256, "train.epochs": 2, "train.threads": 1,
          "train.embedding_optimizer": "sparse_adam", "train.checkpoint_every": 0}


def _step(emb: torch.nn.Embedding, opt: torch.optim.Optimizer, ids: torch.Tensor, seed: int) -> None:
    torch.manual_seed(seed)
    target = torch.randn(len(ids), emb.embedding_dim)
    loss = ((emb(ids) - target) ** 2).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_lazy_adam_matches_torch_sparse_adam_without_weight_decay():
    torch.manual_seed(0)
    a, b = torch.nn.Embedding(30, 4, sparse=True), torch.nn.Embedding(30, 4, sparse=True)
    b.load_state_dict(a.state_dict())
    ours, ref = LazyAdam(a.parameters(), lr=0.05), torch.optim.SparseAdam(b.parameters(), lr=0.05)
    for k in range(20):
        ids = torch.randint(0, 10 + k, (16,))  # repeated rows, and rows touched for the first time late
        _step(a, ours, ids, k)
        _step(b, ref, ids, k)
    torch.testing.assert_close(a.weight, b.weight)


def test_lazy_adam_with_weight_decay_equals_adam_when_every_row_is_touched():
    """Torch Adam's weight decay is L2 added to the gradient; touching every row each step leaves nothing lazy."""
    torch.manual_seed(0)
    a, b = torch.nn.Embedding(8, 3, sparse=True), torch.nn.Embedding(8, 3)
    b.load_state_dict(a.state_dict())
    ours = LazyAdam(a.parameters(), lr=0.05, weight_decay=0.1)
    ref = torch.optim.Adam(b.parameters(), lr=0.05, weight_decay=0.1)
    for k in range(15):
        ids = torch.cat([torch.arange(8), torch.randint(0, 8, (5,))])
        _step(a, ours, ids, k)
        _step(b, ref, ids, k)
    torch.testing.assert_close(a.weight, b.weight)


def test_untouched_rows_keep_weights_and_moments():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 2, sparse=True)
    opt = LazyAdam(emb.parameters(), lr=0.1, weight_decay=0.5)
    _step(emb, opt, torch.tensor([0, 1, 2]), 0)
    before, m = emb.weight.detach().clone(), opt.state[emb.weight]["exp_avg"].clone()
    _step(emb, opt, torch.tensor([1, 2]), 1)
    assert torch.equal(emb.weight[0], before[0])  # not decayed: L2 on touched rows only
    assert torch.equal(opt.state[emb.weight]["exp_avg"][0], m[0])
    assert not torch.equal(emb.weight[1], before[1])


def test_sparse_adam_puts_embeddings_in_their_own_optimiser_and_refuses_unknown_names():
    model = DeepFwFM([5, 7, 3], embed_dim=4, dnn=(8,))
    opt = make_optimizer(model, Config().replace(**SPARSE).train, 1e-3)
    assert isinstance(opt, SplitOptimizer)
    sparse_ids = {id(p) for g in opt.sparse.param_groups for p in g["params"]}
    assert sparse_ids == {id(model.embedding.table.weight), id(model.linear.w.weight)}
    assert model.embedding.table.sparse and model.linear.w.sparse
    dense_ids = {id(p) for g in opt.dense.param_groups for p in g["params"]}
    assert not sparse_ids & dense_ids and len(sparse_ids | dense_ids) == len(list(model.parameters()))
    with pytest.raises(DeeplightError, match="embedding_optimizer"):
        make_optimizer(model, Config().replace(**{"train.embedding_optimizer": "lazy"}).train, 1e-3)


def test_sparse_adam_resumes_from_a_checkpoint_exactly(tmp_path: Path):
    data = write_hashed_dataset(tmp_path / "hashed", rows=8_000)
    cfg = Config().replace(**SPARSE)
    straight = train(data, tmp_path / "straight", cfg)
    # The same run stopped after epoch 1 (last.pt holds the LazyAdam moments), then resumed for epoch 2.
    train(data, tmp_path / "resumed", cfg.replace(**{"train.epochs": 1}))
    ck = checkpoint.load(tmp_path / "resumed" / "last.pt")
    assert set(ck["optimizer"]) == {"dense", "sparse"} and ck["optimizer"]["sparse"]["state"]
    ck["config"] = cfg.to_json()  # as if the 2-epoch run had been killed after its first epoch
    checkpoint.save(ck, tmp_path / "resumed" / "last.pt")
    resumed = train(data, tmp_path / "resumed", cfg)
    assert resumed["valid"] == straight["valid"] and resumed["test"] == straight["test"]
