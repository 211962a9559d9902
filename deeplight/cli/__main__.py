"""`python -m deeplight.cli ...` = `deeplight ...`."""

import sys

from deeplight.cli.main import main

sys.exit(main())
