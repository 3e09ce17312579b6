"""The weighted loss_func in one process: per-sample losses, gradients, numeric faults, reports."""

import argparse
import math

import pytest
import torch

from megatron_reweight import ReweightConfig, SampleReweighter, TemperatureSchedule, compute_weights
from megatron_reweight.arguments import add_reweight_args, reweight_config_from_args
from megatron_reweight.loss import check_megatron_config, per_sample_losses, reduce_reports
from megatron_reweight.loss_checks import LossChecks


def token_losses(weight=None, batch: int = 6, seq: int = 10):
    """Per-token losses of a tiny model, so gradients reach a real parameter (made once, reused)."""
    generator = torch.Generator().manual_seed(0)
    initial = torch.randn(seq, generator=generator)
    weight = torch.nn.Parameter(initial) if weight is None else weight
    inputs = torch.rand(batch, seq, generator=generator) * 3
    return weight, (inputs * weight).square()


def mask_of(batch: int = 6, seq: int = 10, seed: int = 1):
    return (torch.rand(batch, seq, generator=torch.Generator().manual_seed(seed)) < 0.7).float()


def reweighter(strategy="linupper", r=0.5):
    return SampleReweighter(ReweightConfig(strategy, TemperatureSchedule(r=r)))


def test_per_sample_loss_is_masked_mean():
    _, per_token = token_losses()
    mask = mask_of()
    mask[2] = 0
    losses = per_sample_losses(per_token, mask).losses
    for i in range(6):
        if i == 2:
            assert math.isnan(losses[i])
        else:
            expected = per_token[i][mask[i].bool()].mean()
            torch.testing.assert_close(losses[i], expected.detach())


def test_gradient_is_weighted_sum_of_sample_gradients():
    weight, per_token = token_losses()
    mask = mask_of()
    loss, num_tokens, _ = reweighter().loss_func(mask, per_token)
    assert int(num_tokens) == 1  # the scaling does not depend on Megatron's token count
    loss.backward()
    actual = weight.grad.clone()

    weight.grad = None
    _, per_token = token_losses(weight)
    sample_losses = (per_token * mask).sum(1) / mask.sum(1)
    weights = compute_weights(sample_losses.detach(), "linupper", r=0.5)
    (weights * sample_losses).sum().backward()
    torch.testing.assert_close(actual, weight.grad)


def test_tiny_temperature_trains_on_the_upper_half_of_the_losses():
    """Issue: --reweight-r 1e-320 gave all-zero weights, so grad norm 0 and a run that learnt nothing."""
    weight, per_token = token_losses()
    mask = mask_of()
    loss, _, _ = reweighter(r=1e-320).loss_func(mask, per_token)
    loss.backward()
    actual = weight.grad.clone()

    weight.grad = None
    _, per_token = token_losses(weight)
    sample_losses = (per_token * mask).sum(1) / mask.sum(1)
    # LinUpper's limit: its score is flat over the upper half of the loss range, 0-weight below.
    upper = sample_losses.detach() >= (sample_losses.min() + sample_losses.max()).detach() / 2
    assert 0 < upper.sum() < len(upper)
    sample_losses[upper].mean().backward()
    assert actual.norm() > 0
    torch.testing.assert_close(actual, weight.grad)


def test_weights_are_detached():
    _, per_token = token_losses()
    loss, _, _ = reweighter().loss_func(mask_of(), per_token)
    grad = torch.autograd.grad(loss, per_token)[0]
    # d loss / d token = w_i / N_i on unmasked tokens: no term from d w / d loss.
    sample_losses = (per_token * mask_of()).sum(1) / mask_of().sum(1)
    w = compute_weights(sample_losses.detach(), "linupper", r=0.5)
    torch.testing.assert_close(grad, w[:, None] * mask_of() / mask_of().sum(1, keepdim=True))


@pytest.mark.parametrize("fault", [math.nan, math.inf, -math.inf])
def test_nonfinite_sample_gets_zero_weight_and_never_poisons_gradients(fault):
    weight, per_token = token_losses()
    mask = mask_of()
    poison = torch.zeros_like(per_token)
    poison[3, 4] = fault
    mask[3, 4] = 1.0
    loss, _, report = reweighter().loss_func(mask, per_token + poison)
    loss.backward()
    assert torch.isfinite(weight.grad).all()
    assert report["reweight skipped samples"][0] == 1

    # Reference: the same step without sample 3.
    actual = weight.grad.clone()
    weight.grad = None
    _, per_token = token_losses(weight)
    keep = [0, 1, 2, 4, 5]
    sample_losses = (per_token[keep] * mask[keep]).sum(1) / mask[keep].sum(1)
    (compute_weights(sample_losses.detach(), "linupper", r=0.5) * sample_losses).sum().backward()
    torch.testing.assert_close(actual, weight.grad)


def test_lm_loss_report_leaves_a_skipped_sample_out_of_numerator_and_denominator():
    _, per_token = token_losses()
    mask = mask_of()
    poisoned = per_token.detach().clone()
    poisoned[3, 4], mask[3, 4] = math.nan, 1.0
    _, _, report = reweighter().loss_func(mask, poisoned)
    keep = [0, 1, 2, 4, 5]
    expected = torch.stack([(per_token[keep] * mask[keep]).sum(), mask[keep].sum()]).detach()
    torch.testing.assert_close(report["lm loss"], expected)


def checked_reweighter(skip: bool, nan_and_inf: bool = True):
    config = ReweightConfig("linupper", TemperatureSchedule(r=0.5), skip_nonfinite_samples=skip)
    return SampleReweighter(config, checks=LossChecks(nan_and_inf=nan_and_inf))


@pytest.mark.parametrize(
    "fault, masked, message",
    [(math.nan, False, "found NaN"), (math.inf, False, "found Inf"), (math.inf, True, "found NaN")],  # inf x 0 is NaN
)
def test_loss_checks_stop_at_a_nonfinite_loss_as_megatron_does(fault, masked, message, monkeypatch):
    if not torch.cuda.is_available():  # megatron-core's error message names the CUDA device
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    _, per_token = token_losses()
    mask = mask_of()
    poisoned = per_token.detach().clone()
    poisoned[3, 4], mask[3, 4] = fault, float(not masked)  # pretrain_gpt.py sums losses x mask: NaN x 0 is NaN
    with pytest.raises(RuntimeError, match=f"{message} in local forward loss calculation"):
        checked_reweighter(skip=False).loss_func(mask, poisoned)
    checked_reweighter(skip=False, nan_and_inf=False).loss_func(mask, poisoned)  # --no-check-for-nan-in-loss-and-grad


def test_skip_mode_trains_past_a_nonfinite_sample_and_counts_and_logs_it_in_console_numbering(caplog):
    weight, per_token = token_losses()
    mask = mask_of()
    poison = torch.zeros_like(per_token)
    poison[3, 4], mask[3, 4] = math.nan, 1.0
    skipping = checked_reweighter(skip=True)
    skipping.step = 7  # 7 steps done: the console calls this one iteration 8
    loss, _, report = skipping.loss_func(mask, per_token + poison)
    loss.backward()
    assert torch.isfinite(weight.grad).all() and report["reweight skipped samples"][0] == 1
    skipping.loss_func(mask, per_token.detach() + poison)
    assert skipping.skipped_samples == 2
    assert "skipped 1 sample(s) with a non-finite loss at iteration 8 (2 so far" in caplog.text


def test_faults_in_masked_tokens_are_ignored():
    _, per_token = token_losses()
    mask = mask_of()
    mask[0, 0] = 0.0
    poisoned = per_token.detach().clone()
    poisoned[0, 0] = math.nan
    clean_loss, _, _ = reweighter().loss_func(mask, per_token.detach())
    poisoned_loss, _, report = reweighter().loss_func(mask, poisoned)
    torch.testing.assert_close(clean_loss, poisoned_loss)
    assert report["reweight skipped samples"][0] == 0


def test_all_masked_or_all_faulty_batch_gives_zero_finite_gradient():
    weight, per_token = token_losses()
    loss, _, report = reweighter().loss_func(torch.zeros(6, 10), per_token)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(weight.grad, torch.zeros_like(weight.grad))
    assert report["reweight skipped samples"][0] == 6 and report["weighted loss"][1] == 0
    assert "weighted loss" not in reduce_reports([report])


def test_report_keeps_unweighted_lm_loss_and_weight_statistics():
    _, per_token = token_losses()
    mask = mask_of()
    _, _, report = reweighter().loss_func(mask, per_token)
    torch.testing.assert_close(report["lm loss"], torch.stack([(per_token * mask).sum(), mask.sum()]).detach())
    sample_losses = ((per_token * mask).sum(1) / mask.sum(1)).detach()
    w = compute_weights(sample_losses, "linupper", r=0.5)
    stats = reduce_reports([report])
    assert stats["weighted loss"] == pytest.approx(float((w * sample_losses).sum()), rel=1e-6)
    assert stats["max weight x batch"] == pytest.approx(float(w.max() * 6), rel=1e-6)
    assert stats["min weight x batch"] == pytest.approx(float(w.min() * 6), rel=1e-6)
    assert stats["effective sample fraction"] == pytest.approx(float(1 / (w.square().sum() * 6)), rel=1e-6)
    assert stats["sample loss max"] == pytest.approx(float(sample_losses.max()), rel=1e-6)


def test_domain_report_is_each_domains_mean_weight_x_batch():
    _, per_token = token_losses()
    mask = mask_of()
    mask[4] = 0  # an all-masked sample counts for no domain
    domain_ids = torch.tensor([0, 2, 0, 2, 2, 0])
    names = ["web", "code", "books"]
    meter = SampleReweighter(ReweightConfig("linupper", TemperatureSchedule(r=0.5)), domain_names=names)
    reports = [meter.loss_func(mask, per_token, domain_ids)[2], meter.loss_func(mask, per_token, domain_ids)[2]]
    stats = reduce_reports(reports)

    counts = mask.sum(1)
    sample_losses = ((per_token * mask).sum(1) / counts.clamp(min=1)).detach()
    valid = counts > 0
    w = compute_weights(torch.where(valid, sample_losses, torch.nan), "linupper", r=0.5) * 6
    assert stats["weight x batch/web"] == pytest.approx(float(w[[0, 2, 5]].mean()), rel=1e-6)
    assert stats["weight x batch/books"] == pytest.approx(float(w[[1, 3]].mean()), rel=1e-6)
    assert "weight x batch/code" not in stats  # no sample of it: nothing to average
    assert set(reports[0]) >= {f"weight x batch/{name}" for name in names}  # same keys on every rank


def test_reduce_reports_averages_pairs_over_microbatches():
    reports = [{"lm loss": torch.tensor([10.0, 4.0])}, {"lm loss": torch.tensor([2.0, 4.0])}]
    assert reduce_reports(reports) == {"lm loss": 1.5}


def test_temperature_follows_the_step():
    schedule = TemperatureSchedule(r=0.5, warmup_steps=10)
    rw = SampleReweighter(ReweightConfig("linupper", schedule))
    assert rw.temperature() == 100.0
    rw.step = 10
    assert rw.temperature() == 0.5


def test_unsupported_megatron_loss_mode_is_rejected_at_start_up():
    check_megatron_config(calculate_per_token_loss=True, average_in_collective=False)
    check_megatron_config(calculate_per_token_loss=False, average_in_collective=True)
    with pytest.raises(ValueError, match="average_in_collective=True is not supported"):
        check_megatron_config(calculate_per_token_loss=True, average_in_collective=True)


def test_bad_config_fails_at_construction():
    with pytest.raises(ValueError, match="unknown reweighting strategy"):
        ReweightConfig("linuper")
    with pytest.raises(ValueError, match="does not take options"):
        ReweightConfig("linupper", strategy_kwargs={"keep_fraction": 0.5})


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"same shape \[batch, seq\]"):
        reweighter().loss_func(torch.ones(2, 3), torch.ones(2, 4))


def test_command_line_flags_build_the_config():
    parser = add_reweight_args(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--reweight-strategy",
            "midranking",
            "--reweight-r",
            "0.4",
            "--reweight-r-warmup-steps",
            "500",
            "--reweight-skip-fraction",
            "0.1",
            "--reweight-keep-fraction",
            "0.5",
        ]
    )
    config = reweight_config_from_args(args)
    assert config.strategy == "midranking"
    assert config.temperature == TemperatureSchedule(r=0.4, warmup_steps=500)
    assert config.strategy_kwargs == {"skip_fraction": 0.1, "keep_fraction": 0.5}
    assert not config.skip_nonfinite_samples
    assert reweight_config_from_args(parser.parse_args(["--reweight-skip-nonfinite-samples"])).skip_nonfinite_samples
    with pytest.raises(ValueError, match="unknown reweighting strategy"):
        reweight_config_from_args(parser.parse_args(["--reweight-strategy", "bogus"]))
