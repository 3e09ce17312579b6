"""The data console scripts, run as pip installs them in a fresh interpreter without the data
extra, name the extra in one line (the in-process checks are in tests/unit/test_extras.py)."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from tests.helpers import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def run_console_script(name: str, *args: str, blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """The console script as pip installs it (its pyproject.toml target), in a fresh interpreter where
    the `blocked` modules are not installed."""
    module, function = PYPROJECT["scripts"][name].split(":")
    code = (
        f"import sys; sys.modules.update(dict.fromkeys({list(blocked)!r})); sys.argv[0] = {name!r}; "
        f"from {module} import {function}; sys.exit({function}())"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, env={"PYTHONPATH": str(REPO)}, capture_output=True, text=True
    )


@pytest.mark.parametrize("name", ["megatron-reweight-prepare", "megatron-reweight-demo"])
def test_data_commands_without_the_data_extra_name_it(name):
    result = run_console_script(name, "--help", blocked=("tqdm", "datasets"))
    assert result.returncode == 2
    assert result.stderr == f"error: {name} needs datasets, tqdm: pip install 'megatron-reweight[data]'\n"
    assert result.stdout == ""


@pytest.mark.parametrize("module", ["megatron_reweight.data.prepare", "megatron_reweight.data.demo"])
def test_data_modules_run_with_python_m_without_the_data_extra_name_it(module, tmp_path):
    """`python -m MODULE` itself (a sitecustomize hides the extra's modules, as if not installed)."""
    (tmp_path / "sitecustomize.py").write_text('import sys; sys.modules.update(dict.fromkeys(["tqdm", "datasets"]))\n')
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=REPO, env={"PYTHONPATH": f"{tmp_path}:{REPO}"},
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == f"error: python -m {module} needs datasets, tqdm: pip install 'megatron-reweight[data]'\n"
    assert result.stdout == ""
