"""Compact engine: same logits as the pruned PyTorch model for every kind / linear mode, dead parts really
removed, batch-1 == batch path, TorchScript / ONNX parity, save / load round trip, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from deeplight.serve.engine import CompactModel
from deeplight.serve.kernels import TILE
from deeplight.base.errors import DeeplightError
from deeplight.model.deepfwfm import DeepFwFM

SIZES = (7, 5, 9, 3, 6, 4)
ATOL = 1e-5


def make_model(kind: str = "deepfwfm", linear: str = "filv", dnn=(16, 12, 8), seed: int = 0,
               sizes=SIZES, dim: int = 4) -> DeepFwFM:
    """A model with non-trivial random weights (r, biases and linear vectors too, not their init values)."""
    torch.manual_seed(seed)
    model = DeepFwFM(list(sizes), kind=kind, embed_dim=dim, dnn=dnn, linear=linear).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("embedding", "linear", "interaction")) or name == "bias":
                p.normal_(0.0, 0.4)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
    return model


def all_ids(sizes=SIZES, n: int = 300, seed: int = 1) -> np.ndarray:
    """Random rows plus every id of every field at least once."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.integers(0, s, n) for s in sizes], axis=1)
    for f, s in enumerate(sizes):
        ids[:s, f] = np.arange(s)
    return ids.astype(np.int64)


def reference(model: DeepFwFM, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).numpy()


def assert_matches(cm: CompactModel, model: DeepFwFM, ids: np.ndarray | None = None) -> None:
    ids = all_ids([int(s) for s in model.spec["field_sizes"]]) if ids is None else ids
    want = reference(model, ids)
    for backend in ("numba", "numpy"):
        got = cm.score(ids, backend=backend)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.abs(got - want).max() <= ATOL, backend
    one = np.array([cm.score_one(row) for row in ids[:40]])
    assert np.abs(one - want[:40]).max() <= ATOL


# Pruning helpers (in-place magnitude pruning, the same zero patterns deeplight.model.prune produces).

def prune_dnn_unstructured(model: DeepFwFM, frac: float) -> None:
    with torch.no_grad():
        for layer in model.dnn.layers[:-1]:
            w = layer.weight
            k = int(frac * w.numel())
            thr = w.abs().flatten().kthvalue(k).values
            w[w.abs() <= thr] = 0.0


def prune_embedding_entries(model: DeepFwFM, frac: float) -> None:
    with torch.no_grad():
        E = model.embedding.table.weight
        thr = E.abs().flatten().kthvalue(int(frac * E.numel())).values
        E[E.abs() <= thr] = 0.0


def drop_pairs(model: DeepFwFM, pairs) -> None:
    with torch.no_grad():
        for k in pairs:
            model.interaction.pair_mask[k] = 0.0
            model.interaction.r[k] = 0.0


def remove_neurons(model: DeepFwFM, layer: int, neurons) -> None:
    """Structured: row + bias of `layer` and the matching column of the next layer."""
    with torch.no_grad():
        idx = torch.as_tensor(list(neurons), dtype=torch.int64)
        model.dnn.layers[layer].weight[idx] = 0.0
        model.dnn.layers[layer].bias[idx] = 0.0
        model.dnn.layers[layer + 1].weight[:, idx] = 0.0


def zero_rows(model: DeepFwFM, rows) -> None:
    with torch.no_grad():
        model.embedding.table.weight[torch.as_tensor(list(rows))] = 0.0


KIND_MODES = [("deepfwfm", "filv"), ("deepfwfm", "felv"), ("deepfwfm", "lw"), ("fwfm", "filv"),
              ("fwfm", "felv"), ("fwfm", "lw"), ("fm", "filv"), ("lr", "lw")]


@pytest.mark.parametrize("kind,linear", KIND_MODES)
def test_dense_and_pruned_models_match(kind: str, linear: str):
    model = make_model(kind, linear)
    assert_matches(CompactModel.from_model(model), model)
    # Unstructured (paper-style) pruning: 90% of each hidden layer, 40% of embedding entries, half the pairs.
    if model.dnn is not None:
        prune_dnn_unstructured(model, 0.9)
    if model.embedding is not None:
        prune_embedding_entries(model, 0.4)
        drop_pairs(model, range(0, 15, 2))
    cm = CompactModel.from_model(model)
    assert_matches(cm, model)
    if model.interaction is not None:
        assert len(cm.pair_w) == 15 - 8


def test_structured_pruning_removes_neurons_pairs_and_dims():
    model = make_model(dnn=(16, 12, 8))
    remove_neurons(model, 0, range(0, 16, 2))       # 8 of 16 left
    remove_neurons(model, 1, range(5))               # 7 of 12 left
    remove_neurons(model, 2, [0, 1, 2, 7])           # 4 of 8 left
    offsets = np.cumsum([0, *SIZES[:-1]])
    zero_rows(model, [offsets[0] + 1, offsets[2] + 3, offsets[2] + 4, offsets[5]])
    drop_pairs(model, range(3, 15))                  # keep pairs (0,1), (0,2), (0,3)
    cm = CompactModel.from_model(model)
    assert [tuple(layer.weight.shape) for layer in cm.layers] == [(8, 24), (7, 8), (4, 7), (1, 4)]
    assert list(zip(cm.pair_i.tolist(), cm.pair_j.tolist())) == [(0, 1), (0, 2), (0, 3)]
    assert cm.pair_dim == 4 and cm.field_width.tolist() == [5] * 6
    assert_matches(cm, model)
    s = cm.stats()
    assert s["kept_pairs"] == 3 and s["params_total"] < s["source"]["params_total"]
    assert s["flops_per_sample"]["total"] < s["source"]["flops_per_sample"]
    assert [row["shape"] for row in s["dnn_layers"]] == [[8, 24], [7, 8], [4, 7], [1, 4]]


def test_mixed_dense_and_sparse_layers():
    model = make_model(dnn=(24, 16, 8))
    with torch.no_grad():  # only the middle layer pruned: dense -> sparse -> dense
        w = model.dnn.layers[1].weight
        w[w.abs() <= w.abs().flatten().kthvalue(int(0.85 * w.numel())).values] = 0.0
    cm = CompactModel.from_model(model)
    fmts = [(r["batch_format"], r["one_format"]) for r in cm.stats()["dnn_layers"]]
    assert fmts == [("dense", "dense"), ("csr", "csc"), ("dense", "dense"), ("dense", "dense")]
    assert_matches(cm, model)


def test_dead_neurons_fold_their_constant_and_cascade():
    model = make_model(dnn=(10, 6, 5))
    with torch.no_grad():
        model.dnn.layers[0].weight[2] = 0.0           # constant relu(b) neuron: folded into layer 2's bias
        model.dnn.layers[0].bias[2] = 0.7
        model.dnn.layers[1].weight[:, 5] = 0.0         # neuron 5 of layer 1 read by nobody
        model.dnn.layers[1].weight[1:] = 0.0           # layer 2: one neuron with inputs, 5 constants
        model.dnn.layers[1].bias[1:] = torch.tensor([0.3, -0.2, 0.5, 0.1, -1.0])
        model.dnn.layers[2].weight[:, 2] = 0.0
    cm = CompactModel.from_model(model)
    # layer 1: 10 - neuron 2 (constant) - neuron 5 (unread) = 8; layer 2: a single neuron; layer 3 intact
    assert [tuple(layer.weight.shape) for layer in cm.layers] == [(8, 24), (1, 8), (5, 1), (1, 5)]
    assert_matches(cm, model)


def test_degenerate_models():
    # All pairs pruned and the DNN's first layer dead: the DNN is a constant, fields keep only the linear scalar.
    model = make_model(dnn=(8, 8))
    drop_pairs(model, range(15))
    with torch.no_grad():
        model.dnn.layers[0].weight.zero_()
    cm = CompactModel.from_model(model)
    assert cm.layers == [] and len(cm.pair_w) == 0 and cm.pair_dim == 0
    assert cm.field_width.tolist() == [1] * 6 and cm.table.size == sum(SIZES)
    assert_matches(cm, model)

    # A field needed only by the linear term (not in a kept pair, its DNN columns dead), and a field needed by
    # nothing (lw linear weights zero too): scalar only / no lookup at all.
    model = make_model(linear="lw", dnn=(8,))
    drop_pairs(model, [k for k, (a, b) in enumerate(model.interaction.pairs) if 4 in (a, b) or 5 in (a, b)])
    offsets = np.cumsum([0, *SIZES])
    with torch.no_grad():
        model.dnn.layers[0].weight[:, 4 * 4:6 * 4] = 0.0
        model.linear.w.weight[offsets[5]:offsets[6]] = 0.0
    cm = CompactModel.from_model(model)
    assert cm.field_width.tolist() == [5, 5, 5, 5, 1, 0]
    assert cm.layers[0].weight.shape == (8, 16)
    assert_matches(cm, model)

    # FwFM with all pairs pruned: a logistic regression in disguise.
    model = make_model("fwfm")
    drop_pairs(model, range(15))
    cm = CompactModel.from_model(model)
    assert cm.field_width.tolist() == [1] * 6
    assert_matches(cm, model)

    # A whole embedding column dead in every field: that dim disappears from the rows.
    model = make_model()
    with torch.no_grad():
        model.embedding.table.weight[:, 2] = 0.0
    cm = CompactModel.from_model(model)
    assert cm.pair_dim == 3 and cm.field_width.tolist() == [4] * 6 and cm.layers[0].weight.shape[1] == 18
    assert_matches(cm, model)


def test_batch_one_path_equals_batch_path_across_tiles():
    sizes = (50, 3, 40, 8, 30)
    model = make_model(sizes=sizes, dnn=(32, 16))
    prune_dnn_unstructured(model, 0.9)
    cm = CompactModel.from_model(model)
    ids = all_ids(sizes, n=TILE * 2 + 37)  # two full tiles and a partial one
    batch = cm.score(ids)
    one = np.array([cm.score_one(row) for row in ids], np.float32)
    assert np.abs(batch - one).max() <= ATOL
    assert np.abs(cm.score(ids[5:6]) - batch[5:6]).max() <= ATOL
    assert np.abs(cm.score(ids[5:8]) - batch[5:8]).max() <= ATOL  # small batches: one-sample kernel per row
    assert np.abs(batch - reference(model, ids)).max() <= ATOL
    assert cm.score_one(ids[3].astype(np.int32)) == cm.score_one(ids[3]) == cm.score_one(ids[3].tolist())
    # the slow path of score_one's checks: a strided row, big-endian ints, a 0-d / 2-d array
    assert cm.score_one(np.asfortranarray(ids)[3]) == cm.score_one(ids[3].astype(">i8")) == cm.score_one(ids[3])
    for wrong in (ids[3][None], np.int64(1), ids[3][:-1]):
        with pytest.raises(DeeplightError, match="shape"):
            cm.score_one(wrong)
    assert cm.score(np.zeros((0, len(sizes)), np.int64)).shape == (0,)
    # The kernels allocate their own buffers and release the GIL: concurrent calls must not interfere.
    from concurrent.futures import ThreadPoolExecutor

    inputs = [np.roll(ids, 37 * k, axis=0) for k in range(8)]
    expected = [cm.score(x) for x in inputs]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(cm.score, inputs * 4))
    assert all(np.array_equal(r, expected[k % 8]) for k, r in enumerate(results))
    p = cm.predict_proba(ids)
    assert np.allclose(p, 1 / (1 + np.exp(-batch.astype(np.float64))), atol=1e-6)


def test_torchscript_and_onnx_exports_match_the_model(tmp_path: Path):
    import onnxruntime as ort

    model = make_model("deepfwfm", "felv")
    prune_dnn_unstructured(model, 0.9)
    drop_pairs(model, range(1, 15, 3))
    cm = CompactModel.from_model(model)
    ids = all_ids()
    want = reference(model, ids)
    with torch.no_grad():
        assert np.abs(cm.to_torch()(torch.from_numpy(ids)).numpy() - want).max() <= ATOL
    ts = torch.jit.load(str(cm.export_torchscript(tmp_path / "m.pt")))
    ox = ort.InferenceSession(str(cm.export_onnx(tmp_path / "m.onnx")), providers=["CPUExecutionProvider"])
    for batch in (ids, ids[:1], ids[:77]):
        with torch.no_grad():
            assert np.abs(ts(torch.from_numpy(batch)).numpy() - want[:len(batch)]).max() <= ATOL
        assert np.abs(ox.run(None, {"ids": batch})[0] - want[:len(batch)]).max() <= ATOL
    assert np.abs(cm.score(ids, backend="onnx") - want).max() <= ATOL
    # Models without pairs or without a DNN export too.
    for m in (make_model("lr", "lw"), make_model("fwfm")):
        c = CompactModel.from_model(m)
        sess = ort.InferenceSession(str(c.export_onnx(tmp_path / "x.onnx")), providers=["CPUExecutionProvider"])
        assert np.abs(sess.run(None, {"ids": ids})[0] - reference(m, ids)).max() <= ATOL


def test_save_load_round_trip_and_refuses_bad_files(tmp_path: Path):
    model = make_model()
    prune_dnn_unstructured(model, 0.9)
    drop_pairs(model, [0, 4])
    cm = CompactModel.from_model(model, field_names=[f"C{i}" for i in range(6)])
    path = cm.save(tmp_path / "model.npz")
    back = CompactModel.load(path)
    ids = all_ids()
    assert np.array_equal(back.score(ids), cm.score(ids))
    assert back.field_names == cm.field_names and back.stats() == cm.stats()
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DeeplightError, match="not a loadable compact model"):
        CompactModel.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", header=np.frombuffer(b'{"format": "x"}', np.uint8))
    with pytest.raises(DeeplightError, match="format"):
        CompactModel.load(tmp_path / "other.npz")
    with pytest.raises(DeeplightError, match="no such"):
        CompactModel.load(tmp_path / "missing.npz")


def test_bad_input_raises_deeplight_error():
    cm = CompactModel.from_model(make_model())
    ids = all_ids()
    with pytest.raises(DeeplightError, match=r"shape \(batch, 6\)"):
        cm.score(ids[:, :5])
    with pytest.raises(DeeplightError, match=r"shape \(6,\)"):
        cm.score_one(ids[0, :4])
    with pytest.raises(DeeplightError, match="integers"):
        cm.score(ids.astype(np.float32))
    bad = ids.copy()
    bad[17, 2] = SIZES[2]
    for backend in ("numba", "numpy", "onnx"):
        with pytest.raises(DeeplightError, match="id 9 in row 17 is out of range for field 2"):
            cm.score(bad, backend=backend)
    bad[17, 2] = -1
    with pytest.raises(DeeplightError, match="out of range for field 2"):
        cm.score(bad)
    with pytest.raises(DeeplightError, match="out of range for field 2"):
        cm.score_one(bad[17])
    with pytest.raises(DeeplightError, match="out of range"):
        cm.score(bad[17:18])
    with pytest.raises(DeeplightError, match="backend"):
        cm.score(ids, backend="gpu")
    with pytest.raises(DeeplightError, match="DeepFwFM"):
        CompactModel.from_model(torch.nn.Linear(2, 1))


@pytest.mark.parametrize("sparse", [True, False])
def test_sparse_and_dense_layer_kernels_agree(monkeypatch: pytest.MonkeyPatch, sparse: bool):
    # The density thresholds pick CSR / CSC or dense per layer; force each choice on every layer.
    import deeplight.serve.kernels as kernels

    monkeypatch.setattr(kernels, "CSR_MAX_DENSITY", 1.0 if sparse else 0.0)
    monkeypatch.setattr(kernels, "CSC_MAX_DENSITY", 1.0 if sparse else 0.0)
    model = make_model(dnn=(24, 16, 8))
    prune_dnn_unstructured(model, 0.7)
    prune_embedding_entries(model, 0.3)
    cm = CompactModel.from_model(model)
    fmt = {(r["batch_format"], r["one_format"]) for r in cm.stats()["dnn_layers"]}
    assert fmt == ({("csr", "csc")} if sparse else {("dense", "dense")})
    assert_matches(cm, model)
