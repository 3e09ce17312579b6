"""The equivalence check on one GPU (CUDA, NCCL, Transformer Engine layers when installed).

Skipped without a GPU; the multi-rank layouts run on CPU in tests/test_distributed_equivalence.py."""

import os
from pathlib import Path

import pytest
import torch
from distributed import torchrun

WORKER = Path(__file__).parent / "workers" / "equivalence.py"
ON_GPU = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES") or "0"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("strategy", ["linupper", "capped"])
def test_single_gpu_weighted_gradient_matches_reference(tmp_path, strategy):
    options = ["--workdir", str(tmp_path), "--data-parallel", "1", "--microbatches", "3", "--strategy", strategy]
    torchrun(1, WORKER, "--phase", "reference", *options, env=ON_GPU)
    result = torchrun(1, WORKER, "--phase", "layout", *options, env=ON_GPU)
    assert "weights and gradients match the reference" in result.stdout
