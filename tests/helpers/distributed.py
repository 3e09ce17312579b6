"""Launch test workers under torchrun (gloo on CPU), as a real multi-process job."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from megatron_reweight.launch import local_torchrun
from tests.helpers import REPO


def torchrun(nproc: int, script: Path, *args: str, timeout: float = 600, env: dict | None = None):
    """Run `script` on `nproc` local ranks; fail the test with the workers' output if any rank fails."""
    command = local_torchrun(nproc, [str(script), *args])
    # Several ranks share one machine, so they run on CPU with gloo even where a GPU exists.
    environment = {
        **os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})
    }  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment, cwd=REPO)
    if result.returncode != 0:
        raise AssertionError(
            f"torchrun {script.name} {' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout[-6000:]}\n{result.stderr[-8000:]}"
        )
    return result
