"""The run's model: the Llama GPTModel of `megatron_reweight.model`, wrapped as Megatron-LM's
get_model does (bf16 Float16Module, megatron-core's DistributedDataParallel), with the
train-loop hooks that reduce the gradients after the last micro-batch."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from megatron_reweight.model import FUSIONS, Layout, Recompute, build_llama, llama_config_kwargs
from megatron_reweight.training.config import TrainConfig


def transformer_config_kwargs(config: TrainConfig) -> dict:
    """The run's TransformerConfig arguments (a resolved config: --device, --bf16 and the fusions set)."""
    p = config.parallel
    return llama_config_kwargs(
        config.model,
        layout=Layout(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size),
        bf16=config.device.bf16,
        sequence_parallel=p.sequence_parallel,
        calculate_per_token_loss=config.optim.calculate_per_token_loss,
        fusions={name: getattr(config.device, name) for name in FUSIONS},
        recompute=Recompute(p.recompute_granularity, p.recompute_method, p.recompute_num_layers),
        use_cpu_initialization=config.device.device != "cuda",
        transformer_impl=config.device.transformer_impl,
    )


def ddp_config(config: TrainConfig) -> DistributedDataParallelConfig:
    """As Megatron-LM's get_model builds it from the equivalent flags (docs/training.md lists the differences)."""
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=config.device.bf16,
        overlap_grad_reduce=config.parallel.overlap_grad_reduce,
        overlap_param_gather=config.parallel.overlap_param_gather,
        use_distributed_optimizer=config.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=config.optim.check_for_nan_in_loss_and_grad,
        # Pre-scaling by 1/(DP x CP): the weighted loss's scaling is exact with either loss mode
        # (loss.check_megatron_config refuses per-token loss with averaging in the collective).
        average_in_collective=False,
    )


def build_model(config: TrainConfig, padded_vocab_size: int) -> list[DistributedDataParallel]:
    """One model chunk per rank (no virtual pipeline stages)."""
    transformer_config = TransformerConfig(**transformer_config_kwargs(config))
    model = build_llama(
        config.model,
        transformer_config,
        padded_vocab_size,
        use_transformer_engine=config.device.transformer_impl == "transformer_engine",
    )
    if config.device.device == "cuda":
        model.cuda(torch.cuda.current_device())
    if config.device.bf16:
        # As Megatron-LM's get_model: bf16 parameters, fp32 logits/losses on the last stage.
        model = Float16Module(transformer_config, model)

    ddp_model = DistributedDataParallel(transformer_config, ddp_config(config), model)

    # Megatron-LM's train-loop hooks: grads are reduced by finalize_model_grads after the
    # last micro-batch (or overlapped with the backward pass).
    transformer_config.no_sync_func = ddp_model.no_sync
    transformer_config.finalize_model_grads_func = finalize_model_grads
    if config.parallel.overlap_grad_reduce:
        transformer_config.grad_sync_func = ddp_model.start_grad_sync
    return [ddp_model]


def num_parameters(model: list[DistributedDataParallel]) -> int:
    """Parameters of this rank's model shard."""
    return sum(p.numel() for chunk in model for p in chunk.parameters())


@contextmanager
def parameters_synced(model: list[DistributedDataParallel]):
    """With --overlap-param-gather the distributed optimizer's updated parameters are
    all-gathered lazily, in forward pre-hooks of the next step. Around a checkpoint save or
    an evaluation, gather them now and run without the hooks (as Megatron-LM does)."""
    hooked = [chunk for chunk in model if getattr(chunk, "use_forward_hook", False)]
    for chunk in hooked:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()
