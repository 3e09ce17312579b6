"""Packaging: `python -m build` (an sdist, then a wheel built from that sdist), `pip install .`
and `pip install -e .` into fresh environments, and the declared torch floor against an NGC
container's torch build, with pip's own resolver. The environments get no dependencies
(torch and megatron-core are what the rest of the suite tests): what is checked is what pip
installs from this repository's metadata."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO

SCRIPTS = {"megatron-reweight-prepare", "megatron-reweight-demo", "megatron-reweight-export", "megatron-reweight-audit"}
# An NGC PyTorch container's build (25.01): a pre-release version, which sorts below 2.6.0.
NGC_TORCH = "2.6.0a0+ecf3bae40a.nv25.01"


def _run(*command, cwd=REPO) -> subprocess.CompletedProcess:
    # Without PYTHONPATH: the fresh environments must see only what pip put in them.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [str(c) for c in command], check=False, capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )
    assert result.returncode == 0, f"{' '.join(map(str, command))}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _pip(venv: Path, *args) -> subprocess.CompletedProcess:
    """This interpreter's pip, installing into `venv`."""
    return _run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", *args)


def _fresh_venv(path: Path) -> Path:
    _run(sys.executable, "-m", "venv", "--without-pip", path)
    return path


def _site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def test_build_makes_an_sdist_and_a_wheel_from_it(tmp_path):
    # Without build isolation: this environment's setuptools, no download.
    _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", tmp_path)
    (sdist,) = tmp_path.glob("megatron_reweight-*.tar.gz")
    (wheel,) = tmp_path.glob("megatron_reweight-*.whl")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"setup.py", "pyproject.toml", "README.md", "megatron_reweight/export.py"} <= names
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = next(name.split("/")[0] for name in names if name.endswith(".dist-info/METADATA"))
        metadata = archive.read(f"{dist_info}/METADATA").decode()
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    assert {
        "megatron_reweight/__init__.py",
        "megatron_reweight/export.py",
        "megatron_reweight/training/trainer.py",
    } <= names
    assert "Requires-Dist: megatron-core<0.17,>=0.14" in metadata
    assert "Requires-Dist: torch>=2.6.0a0" in metadata
    assert all(f"{script} = " in entry_points for script in SCRIPTS)


def test_pip_install_and_editable_install(tmp_path):
    venv = _fresh_venv(tmp_path / "venv")
    _pip(venv, "install", "--no-deps", REPO)
    installed = _site_packages(venv) / "megatron_reweight"
    assert (installed / "export.py").is_file() and (installed / "training" / "checkpointing.py").is_file()
    for script in SCRIPTS:
        assert (venv / "bin" / script).is_file(), script
    export_script = (venv / "bin" / "megatron-reweight-export").read_text()
    assert "from megatron_reweight.export import main" in export_script

    _pip(venv, "uninstall", "--yes", "megatron-reweight")
    _pip(venv, "install", "--no-deps", "-e", REPO)
    assert not (installed / "export.py").exists()
    # find_spec locates the package without importing it (torch is not in this environment).
    origin = _run(venv / "bin" / "python", "-c", "import importlib.util as u; print(u.find_spec('megatron_reweight').origin)",
                  cwd=tmp_path).stdout.strip()  # fmt: skip
    assert Path(origin) == REPO / "megatron_reweight" / "__init__.py"


def _install_fake_distribution(venv: Path, name: str, version: str) -> None:
    """An installed distribution's metadata only, as pip sees a container's own build."""
    dist_info = _site_packages(venv) / f"{name}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (dist_info / "INSTALLER").write_text("pip\n")
    (dist_info / "RECORD").write_text("")


def _would_install(venv: Path, *requirements: str, report: Path) -> set[str]:
    _pip(venv, "install", "--dry-run", "--quiet", "--report", report, *requirements)
    return {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}


@pytest.mark.parametrize("megatron_core", ["megatron-core==0.14.0"])
def test_pip_keeps_an_ngc_containers_torch(tmp_path, megatron_core):
    """Resolving this package's dependencies from the registry in an environment whose torch is
    an NGC build must not replace it. megatron-core is pinned to the oldest supported release:
    0.16 itself asks for torch>=2.6.0, which 25.01's 2.6.0a0 does not meet (its Dockerfile
    installs with --no-deps for that reason)."""
    venv = _fresh_venv(tmp_path / "venv")
    _install_fake_distribution(venv, "torch", NGC_TORCH)
    assert "torch" not in _would_install(venv, str(REPO), megatron_core, report=tmp_path / "ours.json")
    # The control: a plain release floor does make pip replace the container's torch.
    assert "torch" in _would_install(venv, str(REPO), megatron_core, "torch>=2.6", report=tmp_path / "floor.json")
