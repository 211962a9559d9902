"""deeplight: train, prune and serve sparse DeepFwFM CTR models (DeepLight, Deng et al., WSDM 2021).

Core modules (schema, synth, ingest, features, data, model, prune, compact, train, metrics) import neither
kfp, mlflow nor optuna; `tracking`, `registry` and `sweep` hold that code.
"""

__version__ = "0.1.0"
