"""``python -m criu_xstate``: the same command line as ``criu-xstate``."""

from criu_xstate.cli import console

console()
