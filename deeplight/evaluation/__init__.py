"""Layer 4, evaluation: a model's quality and latency on a split, plots, the sweep report. May import `base`,
`data`, `model` and `serve`; no mlflow, kfp or optuna.

- `evaluate`: test/valid AUC, logloss, calibration, latency of the compact engine, plots.
- `sweep_report`: the Markdown report of a sparsity sweep, from its summary.
"""
