"""Layer 3, serve: the compact inference engine, without torch, mlflow or kfp at scoring time. May import `base`,
`data` and `model` (only to build an engine from a checkpoint).

- `engine`: CompactModel, only the work that survives pruning (load + score serve without torch).
- `kernels`: the numba scoring kernels.
- `export`: the engine as TorchScript and ONNX, parity-checked; `compact_checkpoint` writes all of it.
"""
