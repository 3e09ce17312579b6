"""megatron-reweight: dynamic loss-based sample reweighting for Megatron-Core pretraining."""

from megatron_reweight.loss import ReweightConfig, SampleReweighter, check_megatron_config
from megatron_reweight.strategies import available_strategies, compute_weights, register_strategy
from megatron_reweight.temperature import TemperatureSchedule

__all__ = [
    "ReweightConfig",
    "SampleReweighter",
    "TemperatureSchedule",
    "available_strategies",
    "check_megatron_config",
    "compute_weights",
    "register_strategy",
]
