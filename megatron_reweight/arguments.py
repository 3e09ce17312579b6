"""Command-line flags for reweighting, shared by pretrain_llama.py and Megatron-LM.

`add_reweight_args` has the signature of Megatron-LM's `extra_args_provider`.
"""

from __future__ import annotations

import argparse

from megatron_reweight.loss import ReweightConfig
from megatron_reweight.strategies import available_strategies
from megatron_reweight.temperature import ANNEAL_STYLES, TemperatureSchedule


def add_reweight_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("sample reweighting")
    group.add_argument(
        "--reweight-strategy",
        default="uniform",
        help=f"loss-based sample weighting: one of {', '.join(available_strategies())} (default uniform)",
    )
    group.add_argument("--reweight-r", type=float, default=1.0, help="softmax temperature r after warm-up")
    group.add_argument(
        "--reweight-r-warmup-steps", type=int, default=0, help="steps at --reweight-r-warmup-value first"
    )
    group.add_argument("--reweight-r-warmup-value", type=float, default=100.0, help="r during warm-up")
    group.add_argument(
        "--reweight-r-anneal",
        choices=ANNEAL_STYLES,
        default="step",
        help="after warm-up: jump to r (step, as in the paper) or move there linearly / by cosine",
    )
    group.add_argument("--reweight-r-anneal-steps", type=int, default=0, help="length of a linear/cosine anneal")
    group.add_argument("--reweight-delta", type=float, default=1.0, help="losses are normalised into [-delta, delta]")
    group.add_argument(
        "--reweight-skip-fraction", type=float, default=None, help="midranking: top fraction by loss to skip (n1)"
    )
    group.add_argument(
        "--reweight-keep-fraction",
        type=float,
        default=None,
        help="midranking/highranking/lowranking: fraction kept (n2)",
    )
    group.add_argument("--reweight-cap", type=float, default=None, help="capped: weight cap in units of 1/b (2)")
    group.add_argument(
        "--reweight-skip-nonfinite-samples",
        action="store_true",
        help="give a sample with a NaN/Inf loss weight 0 and train on (logged and counted) instead of "
        "stopping as --check-for-nan-in-loss-and-grad does",
    )
    return parser


def reweight_config_from_args(args: argparse.Namespace) -> ReweightConfig:
    options = {
        "skip_fraction": args.reweight_skip_fraction,
        "keep_fraction": args.reweight_keep_fraction,
        "cap": args.reweight_cap,
    }
    return ReweightConfig(
        strategy=args.reweight_strategy,
        temperature=TemperatureSchedule(
            r=args.reweight_r,
            warmup_steps=args.reweight_r_warmup_steps,
            warmup_r=args.reweight_r_warmup_value,
            anneal=args.reweight_r_anneal,
            anneal_steps=args.reweight_r_anneal_steps,
        ),
        delta=args.reweight_delta,
        strategy_kwargs={name: value for name, value in options.items() if value is not None},
        skip_nonfinite_samples=args.reweight_skip_nonfinite_samples,
    )
