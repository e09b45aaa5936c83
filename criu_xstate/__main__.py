"""``python -m criu_xstate``: the same command line as ``criu-xstate``."""

import sys

from criu_xstate.cli import main

sys.exit(main())
