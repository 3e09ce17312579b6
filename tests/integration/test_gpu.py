"""The equivalence check on one GPU (CUDA, NCCL, Transformer Engine layers when installed).

Skipped without a GPU; the multi-rank layouts run on CPU in tests/integration/test_distributed_equivalence.py."""

import os
from pathlib import Path

import pytest
import torch

from tests.helpers.distributed import torchrun

WORKER = Path(__file__).parent / "workers" / "equivalence.py"
ON_GPU = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES") or "0"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("strategy", ["linupper", "capped"])
def test_single_gpu_weighted_gradient_matches_reference(tmp_path, strategy):
    options = ["--workdir", str(tmp_path), "--data-parallel", "1", "--microbatches", "3", "--strategy", strategy]
    torchrun(1, WORKER, "--phase", "reference", *options, env=ON_GPU)
    result = torchrun(1, WORKER, "--phase", "layout", *options, env=ON_GPU)
    assert "weights and gradients match the reference" in result.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trainer_on_one_gpu_learns_in_bf16(tmp_path):
    """pretrain_llama.py's GPU path: NCCL, bf16 with fp32 main weights, Transformer Engine's
    layers when installed, a checkpoint save and a resume."""
    from tests.helpers.pretrain import SMALL_MODEL, data_args, make_corpus, read_metrics, run

    corpus = make_corpus(tmp_path / "corpus")
    ckpt = tmp_path / "ckpt"
    args = SMALL_MODEL + data_args(corpus, tmp_path / "cache") + [
        "--device", "cuda", "--log-interval", "1", "--eval-interval", "10", "--eval-iters", "1",
        "--save", str(ckpt), "--load", str(ckpt), "--use-distributed-optimizer",
    ]  # fmt: skip
    first = run(1, args + ["--train-iters", "20", "--exit-interval", "10"])
    assert "cuda bf16" in first.stdout and "exiting at iteration 10" in first.stdout
    second = run(1, args + ["--train-iters", "20"])
    assert "resumed from" in second.stdout
    train, evals = read_metrics(ckpt / "metrics.jsonl")
    assert sorted(train) == list(range(1, 21)) and sorted(evals) == [10, 20]
    assert train[20]["lm loss"] < train[1]["lm loss"] - 0.3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("strategy", ["uniform", "linupper", "quadratic", "extremes", "irdro"])
def test_loss_func_never_waits_for_the_gpu(strategy):
    """A host-device sync in the loss function would stall every micro-batch between its
    forward and backward; torch raises on one in "error" mode."""
    from megatron_reweight import ReweightConfig, SampleReweighter, TemperatureSchedule

    reweighter = SampleReweighter(ReweightConfig(strategy, TemperatureSchedule(r=0.5)), domain_names=["a", "b"])
    per_token = torch.rand(8, 64, device="cuda", requires_grad=True)
    loss_mask = (torch.rand(8, 64, device="cuda") < 0.8).float()
    loss_mask[3] = 0
    domain_ids = torch.tensor([0, 1] * 4, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _, _ = reweighter.loss_func(loss_mask, per_token, domain_ids)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(per_token.grad).all()
