"""criu-xstate: find, check and translate in-flight x86 signal frames in CRIU checkpoints."""

__version__ = "0.1.0"
