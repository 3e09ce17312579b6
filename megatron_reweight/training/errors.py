"""The one error type for bad input, reported as a single line before training starts."""

from __future__ import annotations

import os
import sys
import time

# How long a rank other than 0 waits before reporting an error itself (see report_config_error).
REPORT_GRACE_SECONDS = 60


class ConfigError(ValueError):
    """A problem with the command line, the data or the parallel layout."""


class TrainingStopped(RuntimeError):
    """The run cannot go on: a step failed Megatron's loss or gradient checks (that step is not
    saved), or a checkpoint could not be saved."""


def report_config_error(error: BaseException, exit_code: int = 2) -> None:
    """Print `error: ...` once and exit non-zero.

    Every rank meets a bad command line alike, and global rank 0 (or the only process) prints it.
    The other ranks wait: their exit would make torchrun stop rank 0 before it has printed. When
    rank 0 exits, torchrun stops them; a rank still running after the grace period met an error
    of its own and reports it."""
    rank = os.environ.get("RANK", "0")
    if rank != "0":
        time.sleep(REPORT_GRACE_SECONDS)
    where = "" if rank == "0" else f" (rank {rank})"
    print(f"pretrain_llama.py: error{where}: {error}", file=sys.stderr, flush=True)
    raise SystemExit(exit_code)
