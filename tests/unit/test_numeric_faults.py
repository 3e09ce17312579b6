"""Numeric faults in weights and losses: empty batches, float64 losses near overflow, fp16 sums.

References are independent of the code: exact rescaling (normalised losses do not change when the
batch is multiplied by a power of two), Python's exact fractions, and float64 sums."""

from fractions import Fraction

import numpy as np
import pytest
import torch

from megatron_reweight import ReweightConfig, SampleReweighter, TemperatureSchedule, available_strategies
from megatron_reweight import compute_weights
from megatron_reweight.loss import per_sample_losses

HUGE = torch.tensor([1.0e308, 1.7e308, 0.5e308, 1.2e308, 1.7e308 * (1 - 2**-40)], dtype=torch.float64)


@pytest.mark.parametrize("strategy", available_strategies())
def test_empty_batch_gets_empty_weights(strategy):
    for dtype in (torch.float32, torch.float64):
        weights = compute_weights(torch.tensor([], dtype=dtype), strategy)
        assert weights.shape == (0,) and weights.dtype == dtype


@pytest.mark.parametrize("strategy", sorted(set(available_strategies()) - {"irdro"}))
def test_overflow_free_weights_for_float64_losses_near_the_maximum(strategy):
    """Strategies on normalised losses see the same batch scaled by 2**-1000 (exact) as the original."""
    weights = compute_weights(HUGE, strategy, r=0.5)
    expected = compute_weights(HUGE * 2.0**-1000, strategy, r=0.5)
    assert torch.isfinite(weights).all() and float(weights.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(weights, expected, rtol=1e-12, atol=0)


def test_overflow_free_irdro_weights_for_float64_losses_near_the_maximum():
    r = 1e300
    losses = torch.tensor([1.6e308, 1.6e308 - 3e300, 1.6e308 - 1e301, 1.5e308], dtype=torch.float64)
    exact = [Fraction(float(loss)) - Fraction(float(losses.max())) for loss in losses]
    logits = np.array([float(difference / Fraction(r)) for difference in exact])
    expected = np.exp(logits) / np.exp(logits).sum()
    weights = compute_weights(losses, "irdro", r=r)
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-12)


def test_fp16_token_losses_whose_sum_overflows_fp16_are_not_skipped():
    """[4, 8192] finite fp16 tokens near 8: each sample's sum (~65k) exceeds fp16's 65504."""
    generator = torch.Generator().manual_seed(0)
    per_token = (8.0 + torch.rand(4, 8192, generator=generator)).half().requires_grad_()
    mask = torch.ones(4, 8192)
    pieces = per_sample_losses(per_token, mask)
    expected = per_token.detach().double().mean(dim=1)
    torch.testing.assert_close(pieces.losses.double(), expected, rtol=1e-6, atol=0)

    reweighter = SampleReweighter(ReweightConfig("linupper", TemperatureSchedule(r=0.5)))
    loss, _, report = reweighter.loss_func(mask, per_token)
    loss.backward()
    assert float(report["reweight skipped samples"][0]) == 0
    weights = compute_weights(expected, "linupper", r=0.5)
    torch.testing.assert_close(loss.double(), (weights * expected).sum(), rtol=1e-5, atol=0)
    # d loss / d token = w_i / N_i (~3e-5, fp16's subnormal range: step 6e-8).
    reference = (weights / 8192)[:, None].expand(4, 8192)
    torch.testing.assert_close(per_token.grad.double(), reference, rtol=0, atol=6e-8)


def test_nonfinite_sum_of_finite_tokens_never_poisons_the_loss():
    """fp32 tokens whose sum overflows fp32: that sample is skipped and the loss stays finite."""
    per_token = torch.ones(3, 4).requires_grad_()
    scaled = per_token * torch.tensor([[1.0], [3e38], [2.0]])
    loss, _, report = SampleReweighter(ReweightConfig("uniform")).loss_func(torch.ones(3, 4), scaled)
    loss.backward()
    assert float(report["reweight skipped samples"][0]) == 1
    assert torch.isfinite(loss) and float(loss.detach()) == pytest.approx(1.5)
    assert torch.isfinite(per_token.grad).all()


def test_spiky_loss_is_flagged_after_megatrons_warm_up_of_100_losses(monkeypatch):
    from megatron.core import rerun_state_machine

    from megatron_reweight.loss_checks import LossChecks

    monkeypatch.setattr(rerun_state_machine, "_GLOBAL_RERUN_STATE_MACHINE", rerun_state_machine.RerunStateMachine())
    if not torch.cuda.is_available():  # megatron-core's warning names the CUDA device
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    checks = LossChecks(spiky=True)
    for loss in torch.linspace(1.0, 2.0, 100):  # megatron-core's estimate of the largest normal loss
        checks.validate(loss)
    checks.validate(torch.tensor(19.9))
    assert checks.flagged == []
    checks.validate(torch.tensor(20.0))  # 10x the largest seen
    assert checks.flagged == ["spiky loss 20"]
