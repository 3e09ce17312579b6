"""Drop-in pieces for Megatron-LM's pretrain_gpt.py.

    from megatron_reweight.megatron_lm import add_reweight_args, loss_func
    ...
    # in forward_step:  return output_tensor, partial(loss_func, loss_mask, model=model)
    # in main:          pretrain(..., extra_args_provider=add_reweight_args)

`loss_func` has pretrain_gpt.py's signature; it reads the reweighting flags and the
current iteration from Megatron-LM's global args.
"""

from __future__ import annotations

import torch

from megatron_reweight.arguments import add_reweight_args, reweight_config_from_args
from megatron_reweight.loss import SampleReweighter, check_megatron_config

__all__ = ["add_reweight_args", "loss_func"]

_reweighter: SampleReweighter | None = None


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, model=None):
    from megatron.training import get_args  # Megatron-LM, not in the megatron-core wheel

    global _reweighter
    args = get_args()
    if _reweighter is None:
        check_megatron_config(args.calculate_per_token_loss, getattr(args, "ddp_average_in_collective", False))
        _reweighter = SampleReweighter.from_parallel_state(reweight_config_from_args(args))
    _reweighter.step = getattr(args, "curr_iteration", 0)
    return _reweighter.loss_func(loss_mask, output_tensor)
