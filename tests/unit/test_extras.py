"""A missing optional package is one line at start-up naming the extra that installs it."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from megatron_reweight.extras import EXTRA_MODULES, MissingExtraError, require_extra

REPO = Path(__file__).resolve().parents[2]
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


def test_data_command_runs_its_main_when_the_extra_is_installed(monkeypatch, capsys):
    from megatron_reweight.data import prepare_command

    monkeypatch.setattr(sys, "argv", ["megatron-reweight-prepare", "--help"])
    with pytest.raises(SystemExit) as exit_status:
        prepare_command()
    assert exit_status.value.code == 0
    assert "--tokenizer" in capsys.readouterr().out


def test_require_extra_passes_when_installed_and_names_what_is_missing(monkeypatch):
    require_extra("data", "data preparation")  # the test environment has every extra
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    expected = "--tensorboard-dir needs tensorboard: pip install 'megatron-reweight[train]'"
    with pytest.raises(MissingExtraError, match=f"^{re.escape(expected)}$"):
        require_extra("train", "--tensorboard-dir")


def test_extra_modules_are_the_extras_of_pyproject():
    for extra, modules in EXTRA_MODULES.items():
        requirements = PYPROJECT["optional-dependencies"][extra]
        packages = {re.match(r"[A-Za-z0-9_.-]+", requirement).group() for requirement in requirements}
        assert packages == set(modules), extra
