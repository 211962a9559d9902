"""Layer 5, ops: MLflow and Optuna. May import every layer below (base, data, model, serve, evaluation).

- `tracking`: MLflow runs (the tracker protocol of `base.tracker`), redaction of credentials.
- `pyfunc`: the registered MLflow model that scores raw rows.
- `registry`: register a model version (alias challenger), promote it behind a gate (alias champion).
- `sweep`: the Optuna sparsity sweep (search space, storage, trial logging, selection).
- `pytorchjob`: a Kubeflow PyTorchJob rendered with the operator's SDK, created, waited for, failures explained.
"""
