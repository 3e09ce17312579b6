"""Process group and megatron-core model-parallel initialisation.

NCCL on CUDA, gloo on CPU (with megatron-core's CUDA calls redirected to the CPU by
`megatron_reweight.cpu`). Without torchrun the process sets up a world of one.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy
import torch
import torch.distributed as dist

from megatron_reweight.launch import free_port
from megatron_reweight.training.config import TrainConfig


@dataclass(frozen=True)
class Runtime:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    device: torch.device
    dp_rank: int
    dp_size: int
    is_first_stage: bool
    is_last_stage: bool

    @property
    def is_logging_rank(self) -> bool:
        """Megatron logs from the last rank, which holds the loss (last pipeline stage)."""
        return self.rank == self.world_size - 1


def _single_process_env() -> None:
    """torchrun sets these; a plain `python pretrain_llama.py` is a world of one."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def set_seeds(seed: int) -> None:
    """Megatron's _set_random_seed: the same seed on every DP rank, +100 per PP stage, and
    megatron's model-parallel RNG tracker seeded for TP-consistent/TP-distinct streams."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def initialize(config: TrainConfig) -> Runtime:
    _single_process_env()
    use_cuda = config.device.device == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        from megatron_reweight.cpu import enable_megatron_core_on_cpu

        enable_megatron_core_on_cpu()
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=timedelta(minutes=config.parallel.distributed_timeout_minutes),
            device_id=device if use_cuda else None,
        )
    from megatron.core import parallel_state

    par = config.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        context_parallel_size=par.context_parallel_size,
        distributed_timeout_minutes=par.distributed_timeout_minutes,
    )
    from megatron.core.rerun_state_machine import RerunMode, initialize_rerun_state_machine

    initialize_rerun_state_machine(mode=RerunMode.DISABLED)  # as Megatron-LM, without its rerun feature
    set_seeds(config.optim.seed)
    return Runtime(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        device=device,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        is_first_stage=parallel_state.is_pipeline_first_stage(),
        is_last_stage=parallel_state.is_pipeline_last_stage(),
    )


def shutdown() -> None:
    from megatron.core import parallel_state
    from megatron.core.rerun_state_machine import destroy_rerun_state_machine

    destroy_rerun_state_machine()
    if dist.is_initialized():
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
