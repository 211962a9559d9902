"""Layer 6, steps: the bodies of the KFP components (`components/` wraps them thinly). May import every layer
below; imports no kfp itself (the components do).

- `pipeline`: ingest, hash, train, prune, evaluate, register, promote steps and the MLflow parent run.
- `sweep`: the sweep pipeline's init, worker and select steps.
"""
