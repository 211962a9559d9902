"""Compact inference engine for (pruned) DeepFwFM models: only the work that survives pruning is stored and run.

    cm = CompactModel.from_model(pruned_model)     # any DeepFwFM (kinds deepfwfm/fwfm/fm/lr, linear filv/felv/lw)
    cm.score(ids)                                  # ids int (B, F) local per-field ids -> logits float32 (B,)
    cm.score_one(ids[0])                           # one sample, low-overhead path -> float
    cm.predict_proba(ids)                          # sigmoid(score)
    cm.save("model.npz"); CompactModel.load("model.npz")        # np.savez + JSON header, no pickle
    cm.to_torch(); cm.export_torchscript(p); cm.export_onnx(p)  # same function, parity-checked on export
    cm.stats()                                     # params, kept pairs, DNN shapes, bytes, FLOPs per sample

A pruned model is a DeepFwFM whose tensors hold exact zeros; everything here is derived from those zeros:

- Field pairs: only pairs with r * pair_mask != 0 (and embeddings that can overlap) are kept: pair_i/j/w.
- Linear term folded into the embedding row: lin[row] = w[row] + <e_row, v> (filv: v = v[field], felv:
  v = v[row], lw: none) is stored as the first float of the row, so each field costs ONE contiguous fetch.
- Embedding dims: a field keeps the dims that feed something (interaction, or an alive first-layer DNN column)
  and are not zero in every row; a field used only by the linear term keeps the scalar alone; a field used by
  nothing is not looked up at all. All fields' rows live in one flat float32 `table`; field f's row r starts at
  field_base[f] + r * field_width[f] (width = 1 + kept dims). Fields in a kept pair all keep the same dims
  (`pair_dim` of them, first in the row) so pair dot products are aligned, contiguous loops.
  Memory: table floats = sum_f size_f * (1 + kept_f) vs size_f * (dim + 1 [+ dim for felv]) in the model: the
  same 11 floats per row for a filv/lw model whose dims all feed something (Criteo-shaped, 1M rows: 44.6 MB
  either way), 48% less for felv (its per-row v vectors fold into lin), and 1 float instead of 11 (or none) for
  each field only the linear term (or nothing) needs. Zeroed embedding rows (unstructured entries or whole
  rows) are still stored: their lin scalar is usually not zero, and dropping them needs an id -> row
  indirection, a second dependent memory access per field that costs more time than the memory saves.
  The DNN shrinks with its dead neurons; sparse layers are read as CSR (8 bytes per nonzero).
- DNN: dead neurons are removed. A neuron whose incoming row is all zero outputs the constant relu(bias): it is
  folded into the next layer's bias and dropped; a neuron whose outgoing column is all zero is dropped; input
  columns nobody reads are dropped. This repeats to a fixed point (removals cascade), so a fully dead DNN
  becomes a constant in `bias`. Layers stay dense matrices (exports, numpy path); the numba kernels run a layer
  as CSR (batches) / CSC that skips zero inputs (one sample) when its density is below a measured threshold.

Backends (`score(ids, backend=...)`): "numba" (default; fused kernels: one sample or a batch under SMALL_BATCH
rows runs a per-sample kernel, larger batches run in tiles with BLAS sgemm for dense layers), "numpy"
(reference, vectorised numpy; also the fallback without numba) and "onnx" (the exported graph in onnxruntime,
one intra-op thread). In bench/inference.py numba was the fastest at every batch size (1 to 4096) for dense,
paper-pruned and structured-pruned Criteo-shaped models: numpy 2-20x and onnxruntime 3-30x slower, so "numba"
is used throughout. Threads: the numba kernels are single-threaded and release the GIL (score from several
threads in parallel); BLAS follows the process setting (OPENBLAS_NUM_THREADS=1 or threadpoolctl to pin it).

    >>> import numpy as np, torch
    >>> from deeplight.model.deepfwfm import DeepFwFM
    >>> torch.manual_seed(0) and None
    >>> model = DeepFwFM([3, 5, 2], embed_dim=4, dnn=(8, 8)).eval()
    >>> with torch.no_grad():
    ...     model.interaction.pair_mask[1] = 0                 # prune pair (0, 2)
    ...     model.dnn.layers[0].weight[3] = 0                   # neuron 3 of layer 1: constant relu(bias)
    >>> cm = CompactModel.from_model(model)
    >>> cm.pair_i.tolist(), cm.pair_j.tolist(), [tuple(l.weight.shape) for l in cm.layers]
    ([0, 1], [1, 2], [(7, 12), (8, 7), (1, 8)])
    >>> ids = np.array([[0, 4, 1], [2, 0, 0]])
    >>> ref = model(torch.from_numpy(ids)).detach().numpy()
    >>> bool(np.abs(cm.score(ids) - ref).max() <= 1e-5), bool(abs(cm.score_one(ids[1]) - ref[1]) <= 1e-5)
    (True, True)
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from deeplight.base.errors import DeeplightError
from deeplight.base.files import usual_mode
from deeplight.serve.kernels import (HAVE_NUMBA, SMALL_BATCH, pack, score_batch_kernel, score_one_kernel,
                                     score_rows_kernel)

if TYPE_CHECKING:  # torch is imported lazily: load() + score() serve without it
    import torch
    from deeplight.model.deepfwfm import DeepFwFM

FORMAT = "deeplight-compact"
FORMAT_VERSION = 1
PARITY_ATOL = 1e-5
_INT64 = np.dtype(np.int64)
_STRIDE_ONE = (8,)  # a 1-D C-contiguous int64 array



# ---------------------------------------------------------------------------------------------------------------
# Model data


@dataclass
class Layer:
    """One dense layer of the compacted DNN: y = weight @ x + bias (ReLU after every layer but the last)."""

    weight: np.ndarray  # (out, in) float32; unstructured zeros are kept here, the kernels use CSR/CSC views
    bias: np.ndarray  # (out,) float32

    @property
    def nnz(self) -> int:
        return int(np.count_nonzero(self.weight))

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.weight.size)


@dataclass
class CompactModel:
    """Arrays of a compacted DeepFwFM; build with `from_model` or `load`. See the module docstring for layout."""

    field_names: list[str]
    field_sizes: list[int]
    table: np.ndarray  # float32 flat: all fields' rows [lin, kept dims...]
    field_width: np.ndarray  # int64 (F,): floats per row (0 = field not looked up)
    field_dims: list[np.ndarray]  # per field, the source embedding dims kept (int64), in row order
    pair_i: np.ndarray  # int64 (P,) first field of each kept pair
    pair_j: np.ndarray  # int64 (P,) second field
    pair_w: np.ndarray  # float32 (P,) r * pair_mask
    pair_dim: int  # dims in each pair dot product (the first `pair_dim` dims of a pair field's row)
    bias: float  # model bias + constants folded out of the DNN
    layers: list[Layer]
    source: dict[str, Any] = field(default_factory=dict)  # what it was built from (spec, parameter counts)

    def __post_init__(self) -> None:
        self.field_sizes = [int(s) for s in self.field_sizes]
        self.table = np.ascontiguousarray(self.table, dtype=np.float32)
        self.field_width = np.asarray(self.field_width, dtype=np.int64)
        self.pair_i = np.asarray(self.pair_i, dtype=np.int64)
        self.pair_j = np.asarray(self.pair_j, dtype=np.int64)
        self.pair_w = np.asarray(self.pair_w, dtype=np.float32)
        self._check()
        sizes = np.asarray(self.field_sizes, dtype=np.int64)
        self.field_base = np.concatenate([[0], np.cumsum(sizes * self.field_width)[:-1]]).astype(np.int64)
        kept = np.maximum(self.field_width - 1, 0)
        self.x_off = np.concatenate([[0], np.cumsum(kept)[:-1]]).astype(np.int64)  # field's dims in the DNN input
        self.n_x = int(kept.sum())
        self._sizes = sizes
        self._fb, self._ib, self._formats = pack(self)
        # The kernels trust these (no bounds checks), so they keep their own references: reassigning the public
        # attributes afterwards cannot make them read out of bounds.
        self._kargs = (self.table, self._fb, self._ib)
        self._one_shape = (self.n_fields,)
        self._cols = _columns(self)
        self._ort_session: Any = None

    @property
    def n_fields(self) -> int:
        return len(self.field_sizes)

    def _check(self) -> None:
        F = self.n_fields
        if len(self.field_names) != F or self.field_width.shape != (F,) or len(self.field_dims) != F:
            raise DeeplightError("compact: field names, widths and dims must have one entry per field")
        for f, (w, dims) in enumerate(zip(self.field_width, self.field_dims)):
            if w < 0 or (w > 0 and len(dims) != w - 1) or (w == 0 and len(dims)):
                raise DeeplightError(f"compact: field {f} width {w} does not match its {len(dims)} kept dims")
        if int((np.asarray(self.field_sizes) * self.field_width).sum()) != self.table.size:
            raise DeeplightError("compact: table size does not match field sizes x widths")
        P = self.pair_w.shape[0]
        if self.pair_i.shape != (P,) or self.pair_j.shape != (P,):
            raise DeeplightError("compact: pair arrays differ in length")
        for a, b in zip(self.pair_i.tolist(), self.pair_j.tolist()):
            if not (0 <= a < F and 0 <= b < F) or self.field_width[a] - 1 < self.pair_dim or \
                    self.field_width[b] - 1 < self.pair_dim:
                raise DeeplightError(f"compact: pair ({a}, {b}) refers to a field without {self.pair_dim} dims")
        n_in = int(np.maximum(self.field_width - 1, 0).sum())
        for k, layer in enumerate(self.layers):
            layer.weight = np.ascontiguousarray(layer.weight, dtype=np.float32)
            layer.bias = np.ascontiguousarray(layer.bias, dtype=np.float32)
            out, inp = layer.weight.shape
            if inp != n_in or layer.bias.shape != (out,) or out == 0:
                raise DeeplightError(f"compact: DNN layer {k} has shape {layer.weight.shape}, expected (>0, {n_in})")
            n_in = out
        if self.layers and n_in != 1:
            raise DeeplightError("compact: the last DNN layer must have one output")

    # -----------------------------------------------------------------------------------------------------------
    # Building from a DeepFwFM

    @classmethod
    def from_model(cls, model: "DeepFwFM", field_names: Sequence[str] | None = None) -> "CompactModel":
        """Compact a (pruned) DeepFwFM; evaluation semantics (dropout off). Work in float64, store float32."""
        import torch

        from deeplight.model.deepfwfm import DeepFwFM

        if not isinstance(model, DeepFwFM):
            raise DeeplightError(f"compact: expected a DeepFwFM, got {type(model).__name__}")
        sizes = list(model.spec["field_sizes"])
        F = len(sizes)
        names = list(field_names) if field_names is not None else [f"f{i}" for i in range(F)]
        if len(names) != F:
            raise DeeplightError(f"compact: {len(names)} field names for a model with {F} fields")

        def arr(t: torch.Tensor) -> np.ndarray:
            return t.detach().to("cpu", torch.float64).numpy().copy()

        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        field_of_row = np.repeat(np.arange(F), sizes)
        if model.embedding is not None:
            E = arr(model.embedding.table.weight)
        else:
            E = np.zeros((sum(sizes), 0))
        D = E.shape[1]
        lin = arr(model.linear.w.weight)[:, 0]
        if model.linear.mode == "filv":
            lin += (E * arr(model.linear.v)[field_of_row]).sum(1)
        elif model.linear.mode == "felv":
            lin += (E * arr(model.linear.v.weight)).sum(1)
        # alive[f, d]: dim d of field f is non-zero in at least one row (else it contributes nothing anywhere)
        alive = np.logical_or.reduceat(E != 0, offsets, axis=0) if D else np.zeros((F, 0), bool)

        pairs: list[tuple[int, int, float]] = []
        if model.interaction is not None:
            w = arr(model.interaction.weights())
            for (a, b), wk in zip(model.interaction.pairs, w.tolist()):
                if wk != 0 and (alive[a] & alive[b]).any():
                    pairs.append((a, b, wk))
        pair_fields = sorted({a for a, _, _ in pairs} | {b for _, b, _ in pairs})
        pair_dims = np.flatnonzero(alive[pair_fields].any(0)) if pair_fields else np.zeros(0, np.int64)

        dnn_layers: list[tuple[np.ndarray, np.ndarray]] = []
        dnn_const = 0.0
        used_in = np.zeros(0, np.int64)
        if model.dnn is not None:
            Ws = [arr(layer.weight) for layer in model.dnn.layers]
            bs = [arr(layer.bias) for layer in model.dnn.layers]
            dnn_layers, dnn_const, used_in = _compact_dnn(Ws, bs, alive.reshape(-1))

        used = set(used_in.tolist())
        dims: list[np.ndarray] = []
        widths = np.zeros(F, np.int64)
        blocks = []
        for f in range(F):
            if f in pair_fields:
                d_f = pair_dims  # every pair field keeps the same dims: aligned dot products
            else:
                d_f = np.array([d for d in range(D) if f * D + d in used], dtype=np.int64)
            rows = slice(offsets[f], offsets[f] + sizes[f])
            lin_f = lin[rows]
            if len(d_f) == 0 and not lin_f.any():
                dims.append(np.zeros(0, np.int64))  # needed by nothing: no lookup at all
                continue
            dims.append(d_f)
            widths[f] = 1 + len(d_f)
            blocks.append(np.concatenate([lin_f[:, None], E[rows][:, d_f]], axis=1).reshape(-1))
        table = np.concatenate(blocks).astype(np.float32) if blocks else np.zeros(0, np.float32)

        layers = []
        if dnn_layers:
            # First layer: source column f*D + d -> compact input column x_off[f] + position of d in dims[f]
            x_off = np.concatenate([[0], np.cumsum(np.maximum(widths - 1, 0))[:-1]])
            W0, b0 = dnn_layers[0]
            W0c = np.zeros((W0.shape[0], int(np.maximum(widths - 1, 0).sum())))
            src_pos = {c: k for k, c in enumerate(used_in.tolist())}
            for f in range(F):
                for k, d in enumerate(dims[f].tolist()):
                    pos = src_pos.get(f * D + d)
                    if pos is not None:
                        W0c[:, x_off[f] + k] = W0[:, pos]
            dnn_layers[0] = (W0c, b0)
            layers = [Layer(W.astype(np.float32), b.astype(np.float32)) for W, b in dnn_layers]

        spec = dict(model.spec)
        nz = sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())
        source = {"spec": spec, "params_total": int(model.param_counts()["total"]), "params_nonzero": nz,
                  "flops_per_sample": _source_flops(spec)}
        return cls(field_names=names, field_sizes=sizes, table=table, field_width=widths, field_dims=dims,
                   pair_i=np.array([a for a, _, _ in pairs], np.int64),
                   pair_j=np.array([b for _, b, _ in pairs], np.int64),
                   pair_w=np.array([w for _, _, w in pairs], np.float32),
                   pair_dim=int(len(pair_dims)) if pairs else 0,
                   bias=float(np.float32(arr(model.bias)) + np.float32(dnn_const)), layers=layers, source=source)

    # -----------------------------------------------------------------------------------------------------------
    # Scoring

    def _ids2d(self, ids: Any) -> np.ndarray:
        a = np.asarray(ids)
        if a.dtype.kind not in "iu":
            raise DeeplightError(f"compact: ids must be integers, got {a.dtype}")
        if a.ndim != 2 or a.shape[1] != self.n_fields:
            raise DeeplightError(f"compact: ids must have shape (batch, {self.n_fields}), got {a.shape}")
        if a.dtype.kind == "u" and a.size and a.max() > np.iinfo(np.int64).max:
            raise DeeplightError("compact: id too large")
        return np.ascontiguousarray(a, dtype=np.int64)

    def check_ids(self, ids: np.ndarray) -> None:
        """DeeplightError naming the first out-of-range id (row, field), as DeepFwFM does."""
        bad = (ids < 0) | (ids >= self._sizes)
        if bad.any():
            row, f = (int(x) for x in np.argwhere(bad)[0])
            raise DeeplightError(f"compact: id {int(ids[row, f])} in row {row} is out of range for field {f} "
                                 f"({self.field_names[f]}, size {self.field_sizes[f]}); was the data hashed "
                                 f"with another feature map?")

    def score(self, ids: Any, backend: str = "numba") -> np.ndarray:
        """ids int (B, F) local per-field ids -> logits float32 (B,). backend: numba | numpy | onnx."""
        a = self._ids2d(ids)
        if backend == "numba" and HAVE_NUMBA:
            out = np.empty(a.shape[0], np.float32)
            kernel = score_rows_kernel if a.shape[0] < SMALL_BATCH else score_batch_kernel
            if a.shape[0] and kernel(a, *self._kargs, out) >= 0:
                self.check_ids(a)
            return out
        self.check_ids(a)
        if backend in ("numba", "numpy"):
            return self._score_numpy(a)
        if backend == "onnx":
            return self.ort_session().run(None, {"ids": a})[0]
        raise DeeplightError(f"compact: unknown backend {backend!r}; choose numba, numpy or onnx")

    def score_one(self, ids: Any) -> float:
        """One sample: ids int (F,) -> logit. One numba call (~1 us dispatch) plus the arithmetic.

        The checks of the common case (a C-contiguous int64 array of shape (F,)) are identity and tuple
        comparisons: `dtype == np.int64` and `flags.c_contiguous` cost ~1 us together, as much as the arithmetic
        of a pruned model."""
        a = ids
        if type(a) is not np.ndarray or a.dtype is not _INT64 or a.shape != self._one_shape or \
                a.strides != _STRIDE_ONE or not HAVE_NUMBA:
            a = np.asarray(ids)
            if a.shape != self._one_shape:
                raise DeeplightError(f"compact: ids must have shape ({self.n_fields},), got {a.shape}")
            if not HAVE_NUMBA:
                return float(self.score(a[None], backend="numpy")[0])
            a = self._ids2d(a[None])[0]
        v = score_one_kernel(a, *self._kargs)
        if v != v:  # NaN: an out-of-range id (or NaN weights); the slow check names it
            self.check_ids(a[None])
        return float(v)

    def predict_proba(self, ids: Any, backend: str = "numba") -> np.ndarray:
        """Click probabilities float32 (B,). tanh form: no overflow warning for large |logit|."""
        z = self.score(ids, backend)
        return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)

    def _score_numpy(self, ids: np.ndarray) -> np.ndarray:
        """Reference path in vectorised numpy; the torch and ONNX graphs compute exactly these steps."""
        c = self._cols
        B = ids.shape[0]
        vals = self.table[ids[:, c["col_field"]] * c["col_width"] + c["col_off"]]  # (B, active + n_x)
        out = np.float32(self.bias) + vals[:, :c["n_lin"]].sum(1, dtype=np.float32)
        x = vals[:, c["n_lin"]:]
        P, D = len(self.pair_w), self.pair_dim
        if P:
            xa = x[:, c["pair_a"]].reshape(B, P, D)
            xb = x[:, c["pair_b"]].reshape(B, P, D)
            out = out + (xa * xb).sum(2) @ self.pair_w
        for k, layer in enumerate(self.layers):
            x = x @ layer.weight.T + layer.bias
            if k < len(self.layers) - 1:
                np.maximum(x, 0, out=x)
        if self.layers:
            out = out + x[:, 0]
        return out.astype(np.float32)

    # -----------------------------------------------------------------------------------------------------------
    # Exports

    def to_torch(self) -> "torch.nn.Module":
        """An nn.Module (int64 ids (B, F) -> logits (B,)) computing the same as `score`: one gather of compact
        rows, kept-pair dot products, the compacted dense DNN layers."""
        from deeplight.serve.export import torch_module
        return torch_module(self)

    def export_torchscript(self, path: str | Path) -> Path:
        """Save a TorchScript module (dynamic batch); raises DeeplightError unless it reproduces `score`."""
        import torch

        path = Path(path)
        module = self.to_torch().eval()
        example = torch.from_numpy(self._parity_ids(8))
        with torch.no_grad():
            traced = torch.jit.trace(module, example, check_trace=False)
        _atomic_write(path, lambda f: torch.jit.save(traced, f))
        loaded = torch.jit.load(str(path))
        ids = self._parity_ids(257)  # another batch size than the trace's: the batch axis must be dynamic
        with torch.no_grad():
            got = loaded(torch.from_numpy(ids)).numpy()
        self._assert_parity(got, ids, "TorchScript export")
        return path

    def onnx_model(self, opset: int = 17) -> Any:
        """The ONNX graph (onnx.ModelProto), built directly from the compact arrays."""
        from deeplight.serve.export import onnx_graph
        return onnx_graph(self, opset)

    def export_onnx(self, path: str | Path, opset: int = 17) -> Path:
        """Save an ONNX model (input "ids" int64 (batch, F), output "logit" (batch,)); raises DeeplightError
        unless onnxruntime reproduces `score`."""
        import onnx

        path = Path(path)
        proto = self.onnx_model(opset)
        onnx.checker.check_model(proto)
        _atomic_write(path, lambda f: f.write(proto.SerializeToString()))
        from deeplight.serve.export import ort_session
        sess = ort_session(str(path), threads=1)
        ids = self._parity_ids(257)
        self._assert_parity(sess.run(None, {"ids": ids})[0], ids, "ONNX export")
        return path

    def ort_session(self, threads: int = 1) -> Any:
        """A cached onnxruntime session of `onnx_model()` (used by backend="onnx")."""
        if self._ort_session is None:
            from deeplight.serve.export import ort_session
            self._ort_session = ort_session(self.onnx_model().SerializeToString(), threads)
        return self._ort_session

    def _parity_ids(self, n: int, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return np.stack([rng.integers(0, s, n) for s in self.field_sizes], axis=1).astype(np.int64)

    def _assert_parity(self, got: np.ndarray, ids: np.ndarray, what: str) -> None:
        want = self.score(ids)
        diff = float(np.abs(np.asarray(got, np.float64).reshape(-1) - want).max())
        if not diff <= PARITY_ATOL:
            raise DeeplightError(f"compact: {what} differs from the compact engine by {diff:.3g} "
                                 f"(> {PARITY_ATOL}); not exported")

    # -----------------------------------------------------------------------------------------------------------
    # Persistence

    def save(self, path: str | Path) -> Path:
        """One .npz (no pickle): arrays + a JSON header. Written atomically."""
        path = Path(path)
        header = {"format": FORMAT, "version": FORMAT_VERSION, "field_names": self.field_names,
                  "field_sizes": self.field_sizes, "field_width": self.field_width.tolist(),
                  "pair_dim": self.pair_dim, "bias": self.bias, "n_layers": len(self.layers),
                  "layer_shapes": [list(layer.weight.shape) for layer in self.layers], "source": self.source}
        arrays = {"header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), "table": self.table,
                  "field_dims": np.concatenate([np.zeros(0, np.int64), *self.field_dims]).astype(np.int64),
                  "pair_i": self.pair_i, "pair_j": self.pair_j, "pair_w": self.pair_w}
        for k, layer in enumerate(self.layers):
            arrays[f"w{k}"] = layer.weight
            arrays[f"b{k}"] = layer.bias
        _atomic_write(path, lambda f: np.savez(f, **arrays))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CompactModel":
        path = Path(path)
        if not path.exists():
            raise DeeplightError(f"{path}: no such compact model")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            header = json.loads(bytes(arrays["header"]).decode())
            if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
                raise ValueError(f"format {header.get('format')!r} version {header.get('version')!r}, "
                                 f"expected {FORMAT!r} version {FORMAT_VERSION}")
            widths = np.asarray(header["field_width"], np.int64)
            cuts = np.cumsum(np.maximum(widths - 1, 0))[:-1]
            dims = list(np.split(arrays["field_dims"].astype(np.int64), cuts))
            layers = [Layer(arrays[f"w{k}"], arrays[f"b{k}"]) for k in range(int(header["n_layers"]))]
            return cls(field_names=list(header["field_names"]), field_sizes=list(header["field_sizes"]),
                       table=arrays["table"], field_width=widths, field_dims=dims, pair_i=arrays["pair_i"],
                       pair_j=arrays["pair_j"], pair_w=arrays["pair_w"], pair_dim=int(header["pair_dim"]),
                       bias=float(header["bias"]), layers=layers, source=dict(header.get("source", {})))
        except DeeplightError as e:
            raise DeeplightError(f"{path}: {e}") from None
        except Exception as e:  # corrupt or foreign file: say so, never fall back to pickle
            raise DeeplightError(f"{path}: not a loadable compact model ({e.__class__.__name__}: {e})") from None

    # -----------------------------------------------------------------------------------------------------------
    # Statistics

    def stats(self) -> dict[str, Any]:
        """Sizes and per-sample work of the compact model (and of its source model when built from one)."""
        P, D = len(self.pair_w), self.pair_dim
        layers = []
        for layer, (batch_fmt, one_fmt) in zip(self.layers, self._formats):
            layers.append({"shape": list(layer.weight.shape), "nnz": layer.nnz, "density": round(layer.density, 4),
                           "batch_format": batch_fmt, "one_format": one_fmt})
        dense_params = sum(layer.weight.size + layer.bias.size for layer in self.layers)
        params_total = int(self.table.size + P + dense_params + 1)
        params_nonzero = int(np.count_nonzero(self.table) + np.count_nonzero(self.pair_w) + 1 +
                             sum(layer.nnz + np.count_nonzero(layer.bias) for layer in self.layers))
        # Bytes the engine reads: the table, the pairs, each layer in the format the batch kernel uses.
        dnn_bytes = sum(layer.bias.nbytes + (layer.nnz * 8 + (layer.weight.shape[0] + 1) * 4
                                             if row["batch_format"] == "csr" else layer.weight.nbytes)
                        for layer, row in zip(self.layers, layers))
        lookups = int((self.field_width > 0).sum())
        flops = {"linear": lookups, "interaction": 2 * P * D + P,
                 "dnn": sum(2 * (layer.nnz if row["batch_format"] == "csr" else layer.weight.size) +
                            layer.weight.shape[0] for layer, row in zip(self.layers, layers))}
        flops["total"] = sum(flops.values())
        out = {"fields": self.n_fields, "lookups_per_sample": lookups, "kept_dims": self.n_x,
               "floats_per_sample": int(self.field_width.sum()), "kept_pairs": P,
               "total_pairs": self.n_fields * (self.n_fields - 1) // 2, "pair_dim": D,
               "dnn_layers": layers, "params_total": params_total, "params_nonzero": params_nonzero,
               "bytes": {"table": int(self.table.nbytes), "pairs": 20 * P,
                         "dnn": int(dnn_bytes), "total": int(self.table.nbytes + 20 * P + dnn_bytes)},
               "flops_per_sample": flops}
        if self.source:
            out["source"] = dict(self.source)
            spec = self.source.get("spec", {})
            if spec:
                out["source"]["bytes"] = _source_bytes(spec)
        return out


# ---------------------------------------------------------------------------------------------------------------
# Compaction helpers


def _compact_dnn(Ws: list[np.ndarray], bs: list[np.ndarray], in_alive: np.ndarray
                 ) -> tuple[list[tuple[np.ndarray, np.ndarray]], float, np.ndarray]:
    """Remove dead neurons to a fixed point. Returns ([(W, b)] or [] if constant, constant, used input columns).

    Ws[k] is (out, in) float64; Ws[-1] is the output layer (1 row, no ReLU).
    """
    Ws, bs = [W.copy() for W in Ws], [b.copy() for b in bs]
    used = np.flatnonzero(in_alive)
    Ws[0] = Ws[0][:, in_alive]  # inputs that are zero in every row contribute nothing
    L = len(Ws)
    changed = True
    while changed:
        changed = False
        for k in range(L - 1):  # constant neurons: relu(bias), folded into the next layer's bias
            const = ~(Ws[k] != 0).any(1)
            if const.any():
                bs[k + 1] = bs[k + 1] + Ws[k + 1][:, const] @ np.maximum(bs[k][const], 0.0)
                Ws[k], bs[k], Ws[k + 1] = Ws[k][~const], bs[k][~const], Ws[k + 1][:, ~const]
                changed = True
        for k in range(L - 2, -1, -1):  # neurons nobody reads
            unread = ~(Ws[k + 1] != 0).any(0)
            if unread.any():
                Ws[k], bs[k], Ws[k + 1] = Ws[k][~unread], bs[k][~unread], Ws[k + 1][:, ~unread]
                changed = True
        unread_in = ~(Ws[0] != 0).any(0)
        if unread_in.any():
            Ws[0], used = Ws[0][:, ~unread_in], used[~unread_in]
            changed = True
    if Ws[-1].shape[1] == 0:  # the whole DNN is a constant
        return [], float(bs[-1][0]), np.zeros(0, np.int64)
    return list(zip(Ws, bs)), 0.0, used


def _source_flops(spec: dict[str, Any]) -> int:
    """FLOPs per sample of the dense source model as DeepFwFM.forward computes it."""
    F, D, kind = len(spec["field_sizes"]), int(spec["embed_dim"]), spec["kind"]
    lin = F + (2 * F * D if spec["linear"] in ("filv", "felv") and kind != "lr" else 0)
    inter = 0 if kind == "lr" else 2 * F * F * D + 2 * F * D  # R @ E then <E, RE>
    dnn = 0
    if kind == "deepfwfm":
        sizes = [F * D, *spec["dnn"], 1]
        dnn = sum(2 * a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    return lin + inter + dnn


def _source_bytes(spec: dict[str, Any]) -> int:
    rows, F, D, kind = sum(spec["field_sizes"]), len(spec["field_sizes"]), int(spec["embed_dim"]), spec["kind"]
    floats = rows  # linear w
    if kind != "lr":
        floats += rows * D + F * (F - 1) // 2
        floats += {"filv": F * D, "felv": rows * D}.get(spec["linear"], 0)
    if kind == "deepfwfm":
        sizes = [F * D, *spec["dnn"], 1]
        floats += sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    return 4 * (floats + 1)


def _columns(cm: CompactModel) -> dict[str, Any]:
    """Index arrays of the gather used by the numpy, torch and ONNX paths: column c of the gathered (B, C)
    matrix is table[ids[:, col_field[c]] * col_width[c] + col_off[c]]; first the lin scalar of every looked-up
    field, then the kept dims (= the DNN input x). pair_a/pair_b index x for the (P, pair_dim) dot products."""
    active = np.flatnonzero(cm.field_width > 0)
    cols = [(f, 0) for f in active] + [(f, 1 + k) for f in active for k in range(cm.field_width[f] - 1)]
    cf = [f for f, _ in cols]
    cw = [cm.field_width[f] for f, _ in cols]
    co = [cm.field_base[f] + k for f, k in cols]
    D = cm.pair_dim
    pa = (cm.x_off[cm.pair_i][:, None] + np.arange(D)).reshape(-1)
    pb = (cm.x_off[cm.pair_j][:, None] + np.arange(D)).reshape(-1)
    i64 = np.int64
    return {"col_field": np.array(cf, i64), "col_width": np.array(cw, i64), "col_off": np.array(co, i64),
            "n_lin": len(active), "pair_a": pa.astype(i64), "pair_b": pb.astype(i64)}


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, usual_mode())  # mkstemp's 0600 would hide the model from a step running as another user
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
