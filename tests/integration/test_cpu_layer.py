from importlib.metadata import version
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

from tests.helpers import REPO
from tests.helpers.distributed import torchrun


def test_megatron_core_version_is_in_the_declared_range():
    # The CPU layer patches megatron-core internals; it is tested against the range pyproject.toml declares.
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = next(Requirement(d) for d in dependencies if Requirement(d).name == "megatron-core")
    assert declared.specifier.contains(version("megatron-core")), (declared, version("megatron-core"))


def test_cuda_requests_run_on_cpu_and_rng_tracker_forks_correctly():
    result = torchrun(1, Path(__file__).parent / "workers" / "cpu_layer.py")
    assert "cpu layer ok" in result.stdout
