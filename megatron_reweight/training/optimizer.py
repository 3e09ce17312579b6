"""The optimizer (megatron-core's `get_megatron_optimizer`, optionally the distributed
optimizer) and the learning-rate schedule (`OptimizerParamScheduler`, counted in samples as
Megatron-LM does)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_reweight.training.config import TrainConfig


@dataclass
class ModelAndOptimizer:
    """What a training step updates and a checkpoint holds."""

    model: list[DistributedDataParallel]  # one chunk (no virtual pipeline stages)
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler


def optimizer_config(config: TrainConfig) -> OptimizerConfig:
    """As Megatron-LM's get_megatron_optimizer_config builds it from the equivalent flags
    (docs/training.md lists the differences)."""
    o = config.optim
    return OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=config.device.bf16,
        params_dtype=torch.bfloat16 if config.device.bf16 else torch.float32,
        use_distributed_optimizer=config.parallel.use_distributed_optimizer,
        overlap_param_gather=config.parallel.overlap_param_gather,  # else the step all-gathers the parameters too
        overlap_param_gather_with_optimizer_step=False,
    )


def build_optimizer(config: TrainConfig, model: list[DistributedDataParallel]) -> ModelAndOptimizer:
    o = config.optim
    optimizer = get_megatron_optimizer(optimizer_config(config), model)

    gbs = o.global_batch_size
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.lr_warmup_iters * gbs,
        lr_decay_steps=o.lr_decay_iters * gbs,
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=o.train_iters * gbs,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=o.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=o.override_opt_param_scheduler,
    )
    return ModelAndOptimizer(model, optimizer, scheduler)


def current_lr(optimizer: MegatronOptimizer) -> float:
    """The learning rate of the default parameter group (Megatron logs the same)."""
    for group in optimizer.param_groups:
        if group.get("default_config", True):
            return float(group["lr"])
    return float(optimizer.param_groups[0]["lr"])
