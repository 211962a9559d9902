"""The compact engine as TorchScript and ONNX (each parity-checked on export), and `compact_checkpoint`, which
writes a checkpoint's engine and exports to a folder. torch and onnx are imported only here, only when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from deeplight.serve.engine import CompactModel

# ---------------------------------------------------------------------------------------------------------------
# torch / ONNX


def torch_module(cm: CompactModel) -> "torch.nn.Module":
    import torch
    from torch import nn

    c = cm._cols

    class CompactDeepFwFM(nn.Module):
        """ids int64 (B, F) -> logits (B,): gather of compact rows, kept-pair dots, compacted dense layers."""

        def __init__(self) -> None:
            super().__init__()
            t = torch.from_numpy
            self.register_buffer("table", t(cm.table.copy()))
            self.register_buffer("col_field", t(c["col_field"]))
            self.register_buffer("col_width", t(c["col_width"]))
            self.register_buffer("col_off", t(c["col_off"]))
            self.register_buffer("pair_a", t(c["pair_a"]))
            self.register_buffer("pair_b", t(c["pair_b"]))
            self.register_buffer("pair_w", t(cm.pair_w.copy()))
            self.register_buffer("bias", torch.tensor(cm.bias, dtype=torch.float32))
            self.n_lin, self.n_pairs, self.pair_dim = c["n_lin"], len(cm.pair_w), cm.pair_dim
            self.layers = nn.ModuleList()
            for layer in cm.layers:
                lin = nn.Linear(layer.weight.shape[1], layer.weight.shape[0])
                with torch.no_grad():
                    lin.weight.copy_(t(layer.weight))
                    lin.bias.copy_(t(layer.bias))
                self.layers.append(lin)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            vals = self.table[ids.index_select(1, self.col_field) * self.col_width + self.col_off]
            out = self.bias + vals[:, :self.n_lin].sum(1)
            x = vals[:, self.n_lin:]
            if self.n_pairs:
                xa = x.index_select(1, self.pair_a).reshape(-1, self.n_pairs, self.pair_dim)
                xb = x.index_select(1, self.pair_b).reshape(-1, self.n_pairs, self.pair_dim)
                out = out + (xa * xb).sum(2) @ self.pair_w
            for k, layer in enumerate(self.layers):
                x = layer(x)
                if k < len(self.layers) - 1:
                    x = torch.relu(x)
            if len(self.layers):
                out = out + x[:, 0]
            return out

    return CompactDeepFwFM().eval()


def onnx_graph(cm: CompactModel, opset: int) -> Any:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c = cm._cols
    inits: list[Any] = []
    nodes: list[Any] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    i64 = np.int64
    const("table", cm.table)
    g = node("Gather", ["ids", const("col_field", c["col_field"])], "g_ids", axis=1)
    g = node("Mul", [g, const("col_width", c["col_width"])], "g_mul")
    g = node("Add", [g, const("col_off", c["col_off"])], "g_idx")
    vals = node("Gather", ["table", g], "vals", axis=0)
    n_lin, C = c["n_lin"], len(c["col_field"])
    ax1 = const("ax1", np.array([1], i64))
    lin = node("Slice", [vals, const("s0", np.array([0], i64)), const("s1", np.array([n_lin], i64)), ax1], "lin_cols")
    out = node("ReduceSum", [lin, ax1], "lin", keepdims=0)
    out = node("Add", [out, const("bias", np.array(cm.bias, np.float32))], "with_bias")
    x = node("Slice", [vals, const("s2", np.array([n_lin], i64)), const("s3", np.array([C], i64)), ax1], "x")
    P, D = len(cm.pair_w), cm.pair_dim
    if P:
        shape = const("pshape", np.array([-1, P, D], i64))
        xa = node("Reshape", [node("Gather", [x, const("pair_a", c["pair_a"])], "xa_flat", axis=1), shape], "xa")
        xb = node("Reshape", [node("Gather", [x, const("pair_b", c["pair_b"])], "xb_flat", axis=1), shape], "xb")
        dots = node("ReduceSum", [node("Mul", [xa, xb], "xaxb"), const("ax2", np.array([2], i64))], "dots", keepdims=0)
        inter = node("MatMul", [dots, const("pair_w", cm.pair_w)], "inter")
        out = node("Add", [out, inter], "with_inter")
    h = x
    for k, layer in enumerate(cm.layers):
        h = node("MatMul", [h, const(f"w{k}t", layer.weight.T.copy())], f"mm{k}")
        h = node("Add", [h, const(f"b{k}", layer.bias)], f"lin{k}")
        if k < len(cm.layers) - 1:
            h = node("Relu", [h], f"relu{k}")
    if cm.layers:
        dnn = node("Reshape", [h, const("flat", np.array([-1], i64))], "dnn")
        out = node("Add", [out, dnn], "with_dnn")
    nodes.append(helper.make_node("Identity", [out], ["logit"], name="logit"))
    graph = helper.make_graph(
        nodes, "deeplight_compact",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", cm.n_fields])],
        [helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["batch"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="deeplight")
    model.ir_version = min(model.ir_version, 10)  # readable by onnxruntime builds that lag the onnx package
    return model


def ort_session(model: str | bytes, threads: int = 1) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def compact_checkpoint(checkpoint_path: str | Path, out_dir: str | Path, exports: bool = True) -> dict[str, Any]:
    """A trained or pruned checkpoint -> out_dir/compact.npz (+ model.onnx, model.torchscript.pt, stats.json).

    Each export is parity-checked against the compact scorer when written."""
    from deeplight.model.checkpoint import load_model
    from deeplight.base.files import write_json
    from deeplight.serve.engine import CompactModel

    model, ck = load_model(checkpoint_path)
    cm = CompactModel.from_model(model, ck.get("field_names"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"compact": str(cm.save(out / "compact.npz"))}
    if exports:
        paths["onnx"] = str(cm.export_onnx(out / "model.onnx"))
        paths["torchscript"] = str(cm.export_torchscript(out / "model.torchscript.pt"))
    stats = {**cm.stats(), "files": paths, "source": str(checkpoint_path)}
    write_json(out / "stats.json", stats)
    return stats
