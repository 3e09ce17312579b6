from importlib.metadata import version
from pathlib import Path

from tests.helpers.distributed import torchrun


def test_pinned_megatron_core_version():
    # The CPU layer patches megatron-core internals; it is tested against this release.
    assert version("megatron-core") == "0.16.1"


def test_cuda_requests_run_on_cpu_and_rng_tracker_forks_correctly():
    result = torchrun(1, Path(__file__).parent / "workers" / "cpu_layer.py")
    assert "cpu layer ok" in result.stdout
