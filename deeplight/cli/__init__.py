"""Layer 7, the command line: `deeplight` and `deeplight pipeline`. May import everything, and the top-level
`pipelines` and `components` packages.

- `main`: the `deeplight` command (one subcommand per step).
- `pipeline`: `deeplight pipeline compile | run-local | submit`.
"""

from deeplight.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
