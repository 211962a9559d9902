"""Layer 0, the base: what every other layer may use. Imports nothing from deeplight outside `base`.

- `errors`: DeeplightError, the one error a user sees (with the file, row or field at fault).
- `config`: the one Config tree (every default: data, features, model, train, prune, sweep, promote, serve).
- `files`: local / S3 files, atomic output folders, JSON, fingerprints.
- `redact`: what is printed or logged without credentials (URL userinfo, secrets from the environment).
- `arrow`: numpy <-> Arrow conversions without pandas.
- `allocators`: allocator settings for the data steps.
- `tracker`: the tracking protocol core code logs to (`NullTracker` when nothing tracks).
- `provenance`: the code version. `plots`: matplotlib, headless.
"""
