"""Layer 6, steps: the bodies of the KFP components (`components/` wraps them thinly). May import every layer
below; imports no kfp itself (the components do).

- `pipeline`: ingest, hash, train, prune, evaluate, register, promote steps and the MLflow parent run.
- `sweep`: the sweep pipeline's init, worker and select steps.
- `fanout`: the per-file data steps of the fan-out pipeline (plan, ingest + count a file, merge, apply, gather).
- `distributed`: train or prune as a PyTorchJob of N pods (launched and waited for by the step's pod).
"""
