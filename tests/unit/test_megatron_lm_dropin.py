"""The Megatron-LM drop-in's start-up checks and process groups, in one process (the real
pretrain_gpt.py runs in tests/integration/test_megatron_lm.py)."""

import argparse

import pytest
from megatron.core import parallel_state

from megatron_reweight import megatron_lm
from megatron_reweight.arguments import add_reweight_args


def megatron_args(*flags, **settings):
    """Megatron-LM's args as far as the drop-in reads them, with our flags parsed."""
    args = add_reweight_args(argparse.ArgumentParser()).parse_args(list(flags))
    defaults = dict(calculate_per_token_loss=False, ddp_average_in_collective=False, num_experts=None,
                    mtp_num_layers=None, check_for_nan_in_loss_and_grad=True, check_for_spiky_loss=False)  # fmt: skip
    for name, value in {**defaults, **settings}.items():
        setattr(args, name, value)
    return args


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(num_experts=4, calculate_per_token_loss=True), "MoE router multiplies its auxiliary losses"),
        (dict(mtp_num_layers=1), "multi-token-prediction losses bypass the loss function"),
        (dict(calculate_per_token_loss=True, ddp_average_in_collective=True), "average_in_collective"),
        (dict(modelopt_enabled=True), "ModelOpt"),
    ],
)
def test_unsupported_megatron_settings_are_refused_with_the_reason(settings, message):
    with pytest.raises(ValueError, match=message):
        megatron_lm.check_megatron_args(megatron_args(**settings))


def test_supported_settings_pass_and_a_bad_strategy_fails_at_start_up():
    megatron_lm.check_megatron_args(megatron_args("--reweight-strategy", "linupper", num_experts=4))
    with pytest.raises(ValueError, match="unknown reweighting strategy"):
        megatron_lm.check_megatron_args(megatron_args("--reweight-strategy", "bogus"))


def test_the_global_batch_window_is_refused_naming_what_to_use_instead():
    megatron_lm.check_megatron_args(megatron_args("--reweight-window", "micro-batch"))
    with pytest.raises(ValueError, match="not available in Megatron-LM.*Use --reweight-window micro-batch"):
        megatron_lm.check_megatron_args(megatron_args("--reweight-window", "global-batch"))


def test_the_reweighter_follows_the_current_process_groups(monkeypatch):
    groups = {"dp": object(), "cp": object()}
    monkeypatch.setattr(parallel_state, "get_data_parallel_group", lambda with_context_parallel: groups["dp"])
    monkeypatch.setattr(parallel_state, "get_context_parallel_group", lambda: groups["cp"])
    args = megatron_args("--reweight-strategy", "linupper", check_for_spiky_loss=True)
    first = megatron_lm._reweighter(args)
    assert megatron_lm._reweighter(args) is first  # cached while nothing changes
    assert first.data_parallel_group is groups["dp"] and first.checks.spiky and first.checks.nan_and_inf
    groups["dp"] = object()  # an in-process restart rebuilds the groups
    restarted = megatron_lm._reweighter(args)
    assert restarted is not first and restarted.data_parallel_group is groups["dp"]
    assert megatron_lm._reweighter(megatron_args()) is not restarted  # new args (a restart re-parses them)


def test_the_launcher_without_a_script_prints_its_usage():
    with pytest.raises(SystemExit, match=r"^usage: python -m megatron_reweight.megatron_lm PATH/pretrain_gpt.py"):
        megatron_lm.main(["--reweight-strategy", "linupper"])

