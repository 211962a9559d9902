"""Layer 1, data: raw rows -> validated typed Parquet -> per-field ids. May import `base` only.

- `schema`: one declaration per dataset (Criteo, Avazu): columns, types, roles, derived fields.
- `synth`: synthetic data from a known click model (the project's default and test data).
- `validate`: checks raw string/number columns against a schema, naming row and field (ingest and serving).
- `parser`: the compiled single-pass parser for clean text blocks (ingest's fast path).
- `ingest`: raw TSV/CSV (local, .gz, s3://) -> Parquet splits, bad rows quarantined.
- `feature_map`: the FeatureMap (vocabulary or stable hashing, the integer transform) serving reuses.
- `hashing`: the `hash` step: fit a feature map on train, apply it to every split (and to other data).
- `loader`: streams hashed Parquet splits to tensors for training.
- `numba_start`: starts numba without SciPy for the ingest command.
"""
