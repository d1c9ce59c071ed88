"""The tiny offline checkpoints tests build (blip2cli/tiny.py, shared with the benchmarks)."""

from blip2cli.tiny import *  # noqa: F403
from blip2cli.tiny import Q  # noqa: F401  (the query count tests read as tiny.Q)
