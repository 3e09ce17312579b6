"""The model wrapped in megatron-core's DistributedDataParallel, its optimizer
(`get_megatron_optimizer`, optionally the distributed optimizer) and the learning-rate
schedule (`OptimizerParamScheduler`, counted in samples as Megatron-LM does)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from megatron_reweight.model import LlamaShape, build_llama, llama_transformer_config
from megatron_reweight.training.config import TrainConfig


@dataclass
class ModelAndOptimizer:
    model: list[DistributedDataParallel]  # one chunk (no virtual pipeline stages)
    transformer_config: TransformerConfig
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    shape: LlamaShape

    def num_parameters(self) -> int:
        """Parameters of this rank's model shard."""
        return sum(p.numel() for chunk in self.model for p in chunk.parameters())


def llama_shape(config: TrainConfig, padded_vocab_size: int) -> LlamaShape:
    m = config.model
    return LlamaShape(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        seq_length=m.max_position_embeddings,
        vocab_size=padded_vocab_size,
        rotary_base=m.rotary_base,
        norm_epsilon=m.norm_epsilon,
    )


def build_model_and_optimizer(config: TrainConfig, padded_vocab_size: int) -> ModelAndOptimizer:
    shape = llama_shape(config, padded_vocab_size)
    transformer_config = llama_transformer_config(
        shape,
        bf16=config.device.bf16,
        sequence_parallel=config.parallel.sequence_parallel,
        calculate_per_token_loss=False,
        init_method_std=config.model.init_method_std,
    )
    model = build_llama(
        shape, transformer_config, use_transformer_engine=config.device.transformer_impl == "transformer_engine"
    )
    if config.device.device == "cuda":
        model.cuda(torch.cuda.current_device())
    if config.device.bf16:
        # As Megatron-LM's get_model: bf16 parameters, fp32 logits/losses on the last stage.
        model = Float16Module(transformer_config, model)

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=config.device.bf16,
        overlap_grad_reduce=config.parallel.overlap_grad_reduce,
        overlap_param_gather=config.parallel.overlap_param_gather,
        use_distributed_optimizer=config.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=True,
        average_in_collective=False,
    )
    ddp_model = DistributedDataParallel(transformer_config, ddp_config, model)
    chunks = [ddp_model]

    # Megatron-LM's train-loop hooks: grads are reduced by finalize_model_grads after the
    # last micro-batch (or overlapped with the backward pass).
    transformer_config.no_sync_func = ddp_model.no_sync
    transformer_config.finalize_model_grads_func = finalize_model_grads
    if config.parallel.overlap_grad_reduce:
        transformer_config.grad_sync_func = ddp_model.start_grad_sync

    o = config.optim
    optimizer_config = OptimizerConfig(
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
        overlap_param_gather_with_optimizer_step=False,
    )
    optimizer = get_megatron_optimizer(optimizer_config, chunks)

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
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
    return ModelAndOptimizer(chunks, transformer_config, optimizer, scheduler, shape)


def current_lr(optimizer: MegatronOptimizer) -> float:
    """The learning rate of the default parameter group (Megatron logs the same)."""
    for group in optimizer.param_groups:
        if group.get("default_config", True):
            return float(group["lr"])
    return float(optimizer.param_groups[0]["lr"])


@contextmanager
def parameters_synced(mo: ModelAndOptimizer):
    """With --overlap-param-gather the distributed optimizer's updated parameters are
    all-gathered lazily, in forward pre-hooks of the next step. Around a checkpoint save or
    an evaluation, gather them now and run without the hooks (as Megatron-LM does)."""
    hooked = [chunk for chunk in mo.model if getattr(chunk, "use_forward_hook", False)]
    for chunk in hooked:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()
