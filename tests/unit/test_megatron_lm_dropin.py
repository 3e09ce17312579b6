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


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(hybrid_context_parallel=True), "--hybrid-context-parallel is not supported.*vary per sample"),
        (dict(sft=True), "--sft is not supported.*packs several documents into one row"),
    ],
)
def test_refuses_what_a_per_sample_loss_cannot_mean(settings, message):
    for window in ("micro-batch", "global-batch"):
        with pytest.raises(megatron_lm.Refused, match=message):
            megatron_lm.check_megatron_args(megatron_args("--reweight-window", window, **settings))


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(cuda_graph_impl="local"), "CUDA graphs \\(--cuda-graph-impl local\\)"),
        (dict(cuda_graph_impl="transformer_engine"), "CUDA graphs \\(--cuda-graph-impl transformer_engine\\)"),
        (dict(fp8="hybrid", fp8_recipe="delayed"), "FP8 delayed scaling.*amax history"),
        (dict(virtual_pipeline_model_parallel_size=2, overlap_param_gather=True), "the interleaved pipeline schedule"),
    ],
)
def test_global_window_refuses_what_its_two_passes_cannot_replay(settings, message):
    megatron_lm.check_megatron_args(megatron_args("--reweight-window", "micro-batch", **settings))
    with pytest.raises(megatron_lm.Refused, match="--reweight-window global-batch is not supported with " + message):
        megatron_lm.check_megatron_args(megatron_args("--reweight-window", "global-batch", **settings))


def test_global_window_passes_what_it_replays():
    supported = dict(cuda_graph_impl="none", fp8="hybrid", fp8_recipe="tensorwise", overlap_param_gather=True,
                     virtual_pipeline_model_parallel_size=None, num_experts=4, moe_router_enable_expert_bias=True)  # fmt: skip
    megatron_lm.check_megatron_args(megatron_args("--reweight-window", "global-batch", **supported))
    megatron_lm.check_megatron_args(
        megatron_args("--reweight-window", "global-batch", virtual_pipeline_model_parallel_size=2)
    )


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


def test_the_launcher_names_a_missing_script(tmp_path):
    missing = tmp_path / "pretrain_gpt.py"
    with pytest.raises(SystemExit, match=f"^{missing}: no such file; give the pretrain_gpt.py of your Megatron-LM"):
        megatron_lm.main([str(missing), "--reweight-strategy", "linupper"])


def test_the_launcher_without_a_script_prints_its_usage():
    with pytest.raises(SystemExit, match=r"^usage: python -m megatron_reweight.megatron_lm PATH/pretrain_gpt.py"):
        megatron_lm.main(["--reweight-strategy", "linupper"])

