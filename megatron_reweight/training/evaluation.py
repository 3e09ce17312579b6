"""Per-domain validation loss and perplexity (unweighted), as in paper 1's Table 1 / Figure 2.

Each domain of the blend has its own held-out validation dataset (its prefix's valid split).
Every evaluation reads the same first `eval_iters` global batches of each, so the numbers
of different iterations and runs compare directly. The loss is the token-weighted mean
cross-entropy over those batches; perplexity is exp(loss).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_reweight.training.data import data_loader


def unweighted_loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """pretrain_gpt.py's loss_func: (token-loss sum, token count, {'lm loss': [sum, count]})."""
    mask = loss_mask.view(-1).float()
    total = torch.sum(output_tensor.view(-1).float() * mask)
    count = mask.sum().to(torch.int)
    return total, count, {"lm loss": torch.stack([total.detach(), mask.sum()])}


def _batch_loss_func(batch: dict, output_tensor: torch.Tensor):
    return unweighted_loss_func(batch["loss_mask"], output_tensor)


@torch.no_grad()
def evaluate(
    mo, valid_datasets: dict, config, runtime, forward_step, num_microbatches: int
) -> dict[str, dict[str, float]]:
    """Collective over all ranks. Returns {domain: {"loss", "ppl", "tokens"}} on every rank of
    the last pipeline stage, {} elsewhere."""
    if not valid_datasets or config.eval.eval_iters == 0:
        return {}
    o = config.optim
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    for chunk in mo.model:
        chunk.eval()
    results = {}
    try:
        for name, dataset in valid_datasets.items():
            iterator = None
            if runtime.is_first_stage or runtime.is_last_stage:
                loader = data_loader(
                    dataset, 0, o.micro_batch_size, runtime.dp_rank, runtime.dp_size, config.data.num_workers
                )
                iterator = iter(loader)
            reports = []
            for _ in range(config.eval.eval_iters):
                reports += (
                    get_forward_backward_func()(
                        forward_step_func=partial(forward_step, loss_func=_batch_loss_func),
                        data_iterator=iterator,
                        model=mo.model,
                        num_microbatches=num_microbatches,
                        seq_length=config.model.seq_length,
                        micro_batch_size=o.micro_batch_size,
                        forward_only=True,
                    )
                    or []
                )
            if runtime.is_last_stage:
                sums = torch.stack([r["lm loss"] for r in reports]).sum(dim=0)
                if torch.distributed.get_world_size(group) > 1:
                    torch.distributed.all_reduce(sums, group=group)
                loss = float(sums[0] / sums[1].clamp(min=1))
                results[name] = {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(sums[1])}
    finally:
        for chunk in mo.model:
            chunk.train()
    return results
