"""The test suite's warning filters (pyproject.toml) hide what megatron-core and torch say that no
user can act on, and nothing else."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = '''
import warnings


def test_import_the_trainer():
    import megatron_reweight.megatron_lm  # noqa: F401
    import megatron_reweight.training.trainer  # noqa: F401


def test_the_same_message_from_elsewhere_still_shows():
    warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning)
'''


def test_suite_filters_are_narrow(tmp_path):
    (tmp_path / "test_probe.py").write_text(PROBE)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(REPO / "pyproject.toml"),
         "--rootdir", str(tmp_path), str(tmp_path / "test_probe.py")],
        cwd=tmp_path, env={"PYTHONPATH": str(REPO)}, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("2 passed, 1 warning in"), result.stdout
    assert re.search(r"test_probe.py:\d+: UserWarning: Apex is not installed", result.stdout), result.stdout
