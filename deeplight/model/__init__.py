"""Layer 2, model: the DeepFwFM model, its training and its pruning. May import `base` and `data`.

- `deepfwfm`: DeepFwFM built from named parts (embedding, field-weighted interaction, linear term, DNN).
- `checkpoint`: atomic, pickle-free checkpoints and `load_model`, the one checkpoint -> model loader.
- `metrics`: AUC, logloss, calibration.
- `train`: the Trainer (streaming batches, early stopping on valid AUC, resumable checkpoints).
- `prune`: DeepLight's damped gradual magnitude pruning with persistent masks.
"""
