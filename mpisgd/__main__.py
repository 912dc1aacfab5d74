"""`python -m mpisgd` is the `mpisgd` command."""

import sys

from mpisgd.cli import main

sys.exit(main())
