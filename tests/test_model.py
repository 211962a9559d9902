"""DeepFwFM parts against naive references, gradient flow per kind, modes, and a tiny learning check."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from deeplight.base.config import ModelConfig
from deeplight.base.errors import DeeplightError
from deeplight.model.deepfwfm import DNN, DeepFwFM, FieldEmbedding, FieldWeightedInteraction, LinearTerm

SIZES = [3, 7, 1, 5, 4]  # includes a single-id field


def random_ids(sizes: list[int], batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, s, (batch,), generator=g) for s in sizes], 1)


def naive_interaction(E: torch.Tensor, r_of: dict[tuple[int, int], float]) -> torch.Tensor:
    """sum_{i<j} r_ij <e_i, e_j> by a double loop over field pairs."""
    B, n, _ = E.shape
    out = torch.zeros(B, dtype=E.dtype)
    for i in range(n):
        for j in range(i + 1, n):
            out += r_of[(i, j)] * (E[:, i] * E[:, j]).sum(1)
    return out


# --- interaction ---------------------------------------------------------------------------------------

def test_pairs_layout_and_symmetric_matrix():
    inter = FieldWeightedInteraction(39)
    assert inter.r.shape == (741,) and inter.pair_mask.shape == (741,)
    pairs = inter.pairs
    assert len(pairs) == 741 == len(set(pairs))
    assert pairs == sorted(pairs) and all(i < j for i, j in pairs)  # upper triangle, row-major
    with torch.no_grad():
        inter.r.copy_(torch.randn(741))
    R = inter.matrix()
    assert torch.equal(R, R.T)
    assert torch.all(R.diagonal() == 0)
    for k in (0, 1, 37, 38, 400, 740):
        i, j = pairs[k]
        assert R[i, j] == inter.r[k] == R[j, i]


@pytest.mark.parametrize("learnable", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_interaction_matches_double_loop(learnable: bool, masked: bool):
    n, D, B = 7, 5, 16
    torch.manual_seed(1)
    inter = FieldWeightedInteraction(n, learnable=learnable).double()
    if learnable:
        with torch.no_grad():
            inter.r.copy_(torch.randn(inter.r.shape, dtype=torch.float64))
    if masked:
        inter.pair_mask[torch.randperm(inter.pair_mask.numel())[:8]] = 0.0
    E = torch.randn(B, n, D, dtype=torch.float64)
    r = (inter.r * inter.pair_mask).tolist()
    expected = naive_interaction(E, dict(zip(inter.pairs, r)))
    torch.testing.assert_close(inter(E), expected, rtol=1e-12, atol=1e-12)
    if not learnable:
        assert not any(p.requires_grad for p in inter.parameters()) and inter.r.eq(1).all()


def test_fm_and_fwfm_with_unit_r_agree():
    E = torch.randn(4, 6, 3, dtype=torch.float64)
    fwfm = FieldWeightedInteraction(6).double()
    fm = FieldWeightedInteraction(6, learnable=False).double()
    torch.testing.assert_close(fwfm(E), fm(E))


# --- embedding and linear term -------------------------------------------------------------------------

def test_field_embedding_offsets_and_range_check():
    emb = FieldEmbedding(SIZES, dim=4)
    assert emb.table.weight.shape == (sum(SIZES), 4)
    assert emb.offsets.tolist() == [0, 3, 10, 11, 16]
    ids = random_ids(SIZES, 9)
    out = emb(ids)
    assert out.shape == (9, len(SIZES), 4)
    for f, start in enumerate([0, 3, 10, 11, 16]):
        assert torch.equal(out[:, f], emb.table.weight[start + ids[:, f]])
    assert torch.equal(emb(ids.int()), out)  # int32 ids from Parquet work as-is
    bad = ids.clone()
    bad[2, 1] = 7  # field 1 has ids 0..6; 7 would silently read field 2's row
    with pytest.raises(DeeplightError, match="field 1"):
        emb(bad)
    with pytest.raises(DeeplightError, match="shape"):
        emb(ids[:, :3])
    with pytest.raises(DeeplightError):
        emb(-ids - 1)


def test_embedding_init_std():
    emb = FieldEmbedding([50_000], dim=10, init_std=0.01)
    std = emb.table.weight.std().item()
    assert 0.0095 < std < 0.0105


@pytest.mark.parametrize("mode", ["filv", "felv", "lw"])
def test_linear_term_modes(mode: str):
    D = 3
    lin = LinearTerm(SIZES, dim=D, mode=mode).double()
    ids = random_ids(SIZES, 6)
    E = torch.randn(6, len(SIZES), D, dtype=torch.float64)
    offsets = [0, 3, 10, 11, 16]
    expected = torch.zeros(6, dtype=torch.float64)
    for b in range(6):
        for f, start in enumerate(offsets):
            row = start + int(ids[b, f])
            expected[b] += lin.w.weight[row, 0]
            if mode == "filv":
                expected[b] += E[b, f] @ lin.v[f]
            elif mode == "felv":
                expected[b] += E[b, f] @ lin.v.weight[row]
    torch.testing.assert_close(lin(ids, E if mode != "lw" else None), expected)
    n_rows = sum(SIZES)
    held = {name: tuple(p.shape) for name, p in lin.named_parameters()}
    assert held == {"w.weight": (n_rows, 1), **({"v": (len(SIZES), D)} if mode == "filv" else {}),
                    **({"v.weight": (n_rows, D)} if mode == "felv" else {})}


def test_dnn_layers():
    dnn = DNN(12, hidden=(8, 6), dropout=0.5)
    assert [tuple(layer.weight.shape) for layer in dnn.layers] == [(8, 12), (6, 8), (1, 6)]
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in dnn.modules())
    x = torch.randn(5, 12)
    dnn.eval()
    h = x
    for layer in dnn.layers[:-1]:
        h = torch.relu(layer(h))
    torch.testing.assert_close(dnn(x), dnn.layers[-1](h).squeeze(-1))


# --- the full model ------------------------------------------------------------------------------------

PARTS = ("embedding", "interaction", "linear", "dnn", "bias")
ABSENT = {"deepfwfm": set(), "fwfm": {"dnn"}, "fm": {"dnn"}, "lr": {"embedding", "interaction", "dnn"}}


@pytest.mark.parametrize("kind", ["deepfwfm", "fwfm", "fm", "lr"])
def test_gradient_reaches_exactly_the_expected_parts(kind: str):
    torch.manual_seed(0)
    model = DeepFwFM(SIZES, kind=kind, embed_dim=4, dnn=(16, 8), dropout=0.0)
    ids = random_ids(SIZES, 32)
    y = torch.randint(0, 2, (32,)).float()
    logits = model(ids)
    assert logits.shape == (32,) and logits.dtype == torch.float32
    F.binary_cross_entropy_with_logits(logits, y).backward()
    absent = {p for p in PARTS if getattr(model, p) is None}
    assert absent == ABSENT[kind]
    for part in set(PARTS) - absent:
        params = [getattr(model, part)] if part == "bias" else list(getattr(model, part).parameters())
        if kind == "fm" and part == "interaction":
            assert params == []  # r is a fixed buffer of ones
            continue
        assert params, part
        for p in params:
            assert p.grad is not None and p.grad.abs().sum() > 0, part
    if kind == "lr":
        assert model.linear.mode == "lw" and model.linear.v is None
    counts = model.param_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert all(counts[p] == 0 for p in absent)


def test_param_counts_by_formula():
    n_rows, n, D = sum(SIZES), len(SIZES), 4
    model = DeepFwFM(SIZES, kind="deepfwfm", embed_dim=D, dnn=(16, 8))
    dnn = (n * D * 16 + 16) + (16 * 8 + 8) + (8 + 1)
    assert model.param_counts() == {
        "embedding": n_rows * D, "interaction": n * (n - 1) // 2, "linear": n_rows + n * D, "dnn": dnn,
        "bias": 1, "total": n_rows * D + n * (n - 1) // 2 + n_rows + n * D + dnn + 1,
    }
    assert DeepFwFM(SIZES, kind="fm", linear="felv", embed_dim=D).param_counts()["linear"] == n_rows * (1 + D)
    assert DeepFwFM(SIZES, kind="lr").param_counts()["total"] == n_rows + 1


def test_deepfwfm_forward_is_the_sum_of_its_parts():
    torch.manual_seed(0)
    model = DeepFwFM(SIZES, embed_dim=4, dnn=(8,)).eval()
    with torch.no_grad():
        model.bias.fill_(0.3)
        model.interaction.r.copy_(torch.randn(model.interaction.r.shape))
    ids = random_ids(SIZES, 10)
    E = model.embedding(ids)
    expected = 0.3 + model.linear(ids, E) + model.interaction(E) + model.dnn(E.reshape(10, -1))
    torch.testing.assert_close(model(ids), expected)


def test_eval_is_deterministic_and_dropout_only_in_train():
    torch.manual_seed(0)
    model = DeepFwFM(SIZES, embed_dim=4, dnn=(64, 64), dropout=0.5)
    ids = random_ids(SIZES, 64)
    model.eval()
    with torch.no_grad():
        a, b = model(ids), model(ids)
    assert torch.equal(a, b)
    model.train()
    with torch.no_grad():
        c, d = model(ids), model(ids)
    assert not torch.equal(c, d) and not torch.equal(c, a)
    # Without a DNN there is nothing stochastic, so train and eval agree.
    fwfm = DeepFwFM(SIZES, kind="fwfm", embed_dim=4)
    with torch.no_grad():
        assert torch.equal(fwfm.train()(ids), fwfm.eval()(ids))


def test_pair_mask_zeroes_a_pair_in_the_model():
    torch.manual_seed(0)
    model = DeepFwFM(SIZES, kind="fwfm", embed_dim=4).eval()
    ids = random_ids(SIZES, 8)
    E = model.embedding(ids)
    k = model.interaction.pairs.index((1, 3))
    before = model(ids)
    model.interaction.pair_mask[k] = 0.0
    pair_term = model.interaction.r[k] * (E[:, 1] * E[:, 3]).sum(1)
    torch.testing.assert_close(model(ids), before - pair_term)


@pytest.mark.parametrize("kind", ["deepfwfm", "fm"])
def test_traced_model_matches_eager_with_a_pruned_pair(kind: str):
    # Tracing (TorchScript / ONNX export) skips the data-dependent checks and the mask-dependent FM shortcut.
    torch.manual_seed(0)
    model = DeepFwFM(SIZES, kind=kind, embed_dim=4, dnn=(8,)).eval()
    model.interaction.pair_mask[3] = 0.0
    ids = random_ids(SIZES, 6)
    with torch.no_grad():
        traced = torch.jit.trace(model, ids)
        torch.testing.assert_close(traced(random_ids(SIZES, 9, seed=1)), model(random_ids(SIZES, 9, seed=1)))


def test_spec_roundtrip_and_from_config():
    torch.manual_seed(0)
    model = DeepFwFM(SIZES, kind="deepfwfm", embed_dim=4, dnn=(8, 8), linear="felv").eval()
    spec = json.loads(json.dumps(model.spec))  # a checkpoint stores it as JSON
    clone = DeepFwFM.from_spec(spec).eval()
    clone.load_state_dict(model.state_dict())
    ids = random_ids(SIZES, 5)
    with torch.no_grad():
        assert torch.equal(clone(ids), model(ids))
    cfg = ModelConfig(kind="fwfm", embed_dim=6, dnn=(5,), linear="lw")
    m = DeepFwFM.from_config(SIZES, cfg)
    assert m.dnn is None and m.embedding.dim == 6 and m.linear.mode == "lw"
    assert m.spec["kind"] == "fwfm" and m.spec["dnn"] == [5]
    with pytest.raises(DeeplightError, match="spec"):
        DeepFwFM.from_spec({**spec, "colour": "red"})


def test_bad_settings_raise_clear_errors():
    with pytest.raises(DeeplightError, match="kind"):
        DeepFwFM(SIZES, kind="dcn")
    with pytest.raises(DeeplightError, match="linear"):
        DeepFwFM(SIZES, linear="nope")
    with pytest.raises(DeeplightError, match="field"):
        DeepFwFM([])
    with pytest.raises(DeeplightError, match="field"):
        DeepFwFM([3, 0])
    with pytest.raises(DeeplightError, match="dropout"):
        DeepFwFM(SIZES, dropout=1.0)
    model = DeepFwFM(SIZES, kind="lr")
    with pytest.raises(DeeplightError, match="out of range"):
        model(torch.full((2, len(SIZES)), 3))  # field 2 has a single id


def test_fwfm_learns_the_planted_field_pair():
    """Clicks depend on per-feature effects plus one bilinear interaction between fields 1 and 4 only;
    FwFM should give that pair a larger |r| than any other (all pairs start equal at r = 1)."""
    n, n_fields, size, planted = 20_000, 6, 8, (1, 4)
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, size, (n, n_fields), generator=g)
        w = 0.3 * torch.randn(n_fields, size, generator=g)
        U, V = torch.randn(size, 2, generator=g), torch.randn(size, 2, generator=g)
        logit = -0.5 + w.gather(1, ids.T).sum(0) + 1.5 * (U[ids[:, 1]] * V[ids[:, 4]]).sum(1)
        y = torch.bernoulli(torch.sigmoid(logit), generator=g)

        torch.manual_seed(seed)
        model = DeepFwFM([size] * n_fields, kind="fwfm", embed_dim=4, init_std=0.1)
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        for _ in range(6):
            for batch in torch.randperm(n).split(500):
                loss = F.binary_cross_entropy_with_logits(model(ids[batch]), y[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
        r = model.interaction.r.detach().abs()
        k = model.interaction.pairs.index(planted)
        others = torch.cat([r[:k], r[k + 1:]])
        assert r[k] > others.max(), (seed, r[k].item(), others.max().item())
