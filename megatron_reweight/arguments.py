"""Command-line flags for reweighting, shared by pretrain_llama.py and Megatron-LM.

The flags are derived from the fields of `ReweightConfig` and `TemperatureSchedule` (their
defaults, types and help) and of `StrategyOptions` below. `add_reweight_args` has the
signature of Megatron-LM's `extra_args_provider`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from megatron_reweight.loss import ReweightConfig
from megatron_reweight.settings import add_arguments, build, setting, to_dict


@dataclass
class StrategyOptions:
    """Options of some strategies; a strategy that does not take an option refuses it."""

    reweight_skip_fraction: float | None = setting(None, "midranking: top fraction by loss to skip (n1)")
    reweight_keep_fraction: float | None = setting(None, "midranking/highranking/lowranking: fraction kept (n2)")
    reweight_cap: float | None = setting(None, "capped: weight cap in units of 1/b; default: 2")


def add_reweight_args(
    parser: argparse.ArgumentParser, defaults: dict | None = None, note=None
) -> argparse.ArgumentParser:
    """`defaults` and `note` adjust the help text (see settings.add_arguments)."""
    group = parser.add_argument_group("sample reweighting")
    add_arguments(group, ReweightConfig, defaults, note)
    add_arguments(group, StrategyOptions, defaults, note)
    return parser


def reweight_config_from_args(args: argparse.Namespace, overrides: dict | None = None) -> ReweightConfig:
    """The flags' values, else `overrides` (keyed by flag dest), else the declared defaults."""
    values = {**(overrides or {}), **{k: v for k, v in vars(args).items() if v is not None}}
    options = to_dict(build(StrategyOptions, values))
    kwargs = {name.removeprefix("reweight_"): value for name, value in options.items() if value is not None}
    return build(ReweightConfig, values, strategy_kwargs=kwargs)
