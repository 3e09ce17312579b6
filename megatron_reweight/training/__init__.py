"""A Megatron-style pretraining loop for Llama models on megatron-core, with reweighting.

Programmatic use:

    from megatron_reweight.training import parse_config, train
    result = train(parse_config(["--preset", "tiny", "--mock-data", "--train-iters", "20"]))
    result.train_history[-1]["lm loss"]

or run `pretrain_llama.py` and read the JSON-lines metrics file (--metrics-file).
"""

from megatron_reweight.training.arguments import build_parser, config_from_args, parse_config
from megatron_reweight.training.config import PRESETS, Preset, TrainConfig, preset_config
from megatron_reweight.training.errors import ConfigError
from megatron_reweight.training.trainer import TrainResult, main, train

__all__ = [
    "PRESETS",
    "ConfigError",
    "Preset",
    "TrainConfig",
    "TrainResult",
    "build_parser",
    "config_from_args",
    "main",
    "parse_config",
    "preset_config",
    "train",
]
