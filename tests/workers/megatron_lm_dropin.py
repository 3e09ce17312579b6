"""One rank of test_megatron_lm_dropin.py: Megatron-LM's pretrain_gpt.py calling our loss_func.

Megatron-LM is not in the megatron-core wheel, so `megatron.training.get_args` is provided
here with the fields Megatron-LM's parser sets, plus our flags from add_reweight_args."""

import argparse
import sys
import types

import torch
import torch.distributed as dist

from megatron_reweight.cpu import enable_megatron_core_on_cpu

enable_megatron_core_on_cpu()

from megatron.core import parallel_state

from megatron_reweight import compute_weights
from megatron_reweight.megatron_lm import add_reweight_args, loss_func

parser = add_reweight_args(argparse.ArgumentParser())
ARGS = parser.parse_args(["--reweight-strategy", "linupper", "--reweight-r", "0.5", "--reweight-r-warmup-steps", "3"])
ARGS.calculate_per_token_loss = False
ARGS.curr_iteration = 0
sys.modules["megatron.training"] = types.SimpleNamespace(get_args=lambda: ARGS)

dist.init_process_group("gloo")
parallel_state.initialize_model_parallel(1, 1)
rank, world = dist.get_rank(), dist.get_world_size()

all_losses = torch.rand(world * 3, 8, generator=torch.Generator().manual_seed(0)) * 4
mask = torch.ones(3, 8)
local = all_losses[rank * 3 : (rank + 1) * 3].clone().requires_grad_()
sample_losses = all_losses.mean(dim=1)

for iteration, r in ((0, 100.0), (3, 0.5)):  # warm-up r = 100, then r = 0.5
    ARGS.curr_iteration = iteration
    loss, num_tokens, report = loss_func(mask, local, model=None)
    (grad,) = torch.autograd.grad(loss, local)
    expected = compute_weights(sample_losses, "linupper", r=r)[rank * 3 : (rank + 1) * 3]
    # loss = DP * sum_i w_i f_i, so d loss / d token = DP * w_i / 8
    torch.testing.assert_close(grad, world * expected[:, None].expand(3, 8) / 8)
    assert set(report) >= {"lm loss", "weighted loss", "max weight x batch"}
print(f"rank {rank}: drop-in ok")
dist.destroy_process_group()
