"""The real run's command line of an sbatch script (DRY_RUN=1, no Slurm needed)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from tests.helpers import REPO

SLURM_DIR = REPO / "examples" / "slurm"


def sbatch_command(script: str, tmp_path: Path, **env: str) -> tuple[list[str], int, str]:
    """The trainer's flags, the world size and the printed output of an sbatch script's real run."""
    data = tmp_path / "data" / "fineweb" / "part-000"
    data.mkdir(parents=True, exist_ok=True)
    (data / "data_path.txt").write_text(f"1 {data}/fineweb_00000\n")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    environment.update(DRY_RUN="1", RUN_ROOT=str(tmp_path / "runs"), DATA_ROOT=str(tmp_path / "data"), IMAGE="x")
    environment.update(env)
    result = subprocess.run(
        ["bash", str(SLURM_DIR / script)], env=environment, cwd=REPO, capture_output=True, text=True, check=True
    )
    argv = shlex.split(next(line for line in result.stdout.splitlines() if line.startswith("srun ")))
    nodes = int(next(a for a in argv if a.startswith("--nnodes=")).split("=")[1])
    per_node = int(next(a for a in argv if a.startswith("--nproc-per-node=")).split("=")[1])
    return argv[argv.index("/opt/megatron-reweight/pretrain_llama.py") + 1 :], nodes * per_node, result.stdout
