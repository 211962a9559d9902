"""`python -m deeplight ...` = `deeplight ...` (also under torchrun)."""

import sys

from deeplight.cli.main import main

sys.exit(main())
