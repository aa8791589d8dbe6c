"""`python -m evolve` runs the evolve command."""

import sys

from evolve.cli import main

sys.exit(main())
