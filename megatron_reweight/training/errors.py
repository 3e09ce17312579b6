"""The one error type for bad input, reported as a single line before training starts."""

from __future__ import annotations

import os
import sys


class ConfigError(ValueError):
    """A problem with the command line, the data or the parallel layout."""


def report_config_error(error: BaseException, exit_code: int = 2) -> None:
    """Print `error: ...` once (global rank 0, or the only process) and exit non-zero."""
    if os.environ.get("RANK", "0") == "0":
        print(f"pretrain_llama.py: error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(exit_code)
