"""A missing optional package is one line at start-up naming the extra that installs it."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest

from megatron_reweight.extras import EXTRA_MODULES, MissingExtraError, require_extra

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


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
