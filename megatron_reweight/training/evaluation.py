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

from megatron_reweight.loss import sum_reports
from megatron_reweight.training.data import data_loader
from megatron_reweight.training.model import parameters_synced


def unweighted_loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """pretrain_gpt.py's loss_func: (token-loss sum, token count, {'lm loss': [sum, count]})."""
    mask = loss_mask.view(-1).float()
    total = torch.sum(output_tensor.view(-1).float() * mask)
    count = mask.sum().to(torch.int)
    return total, count, {"lm loss": torch.stack([total.detach(), mask.sum()])}


def _batch_loss_func(batch: dict, output_tensor: torch.Tensor):
    return unweighted_loss_func(batch["loss_mask"], output_tensor)


class Validator:
    """Per-domain validation every --eval-interval steps and at the end of training."""

    def __init__(self, config, valid_datasets: dict, runtime, forward_step, num_microbatches: int):
        self.config, self.valid_datasets, self.runtime = config, valid_datasets, runtime
        self.forward_step, self.num_microbatches = forward_step, num_microbatches

    def should_validate(self, iteration: int) -> bool:
        e = self.config.eval
        return (
            bool(self.valid_datasets)
            and e.eval_iters > 0
            and (iteration % e.eval_interval == 0 or iteration == self.config.optim.train_iters)
        )

    def validate(self, model) -> dict[str, dict[str, float]]:
        """Collective over all ranks. Returns {domain: {"loss", "ppl", "tokens"}} on every rank
        of the last pipeline stage, {} elsewhere."""
        with parameters_synced(model), torch.no_grad():
            return self._validate(model)

    def _validate(self, model) -> dict[str, dict[str, float]]:
        config, runtime, o = self.config, self.runtime, self.config.optim
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        for chunk in model:
            chunk.eval()
        results = {}
        try:
            for name, dataset in self.valid_datasets.items():
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
                            forward_step_func=partial(self.forward_step, loss_func=_batch_loss_func),
                            data_iterator=iterator,
                            model=model,
                            num_microbatches=self.num_microbatches,
                            seq_length=config.model.seq_length,
                            micro_batch_size=o.micro_batch_size,
                            forward_only=True,
                        )
                        or []
                    )
                if runtime.is_last_stage:
                    loss_sum, tokens = sum_reports(reports, group)["lm loss"]
                    loss = float(loss_sum / tokens.clamp(min=1))
                    results[name] = {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(tokens)}
        finally:
            for chunk in model:
                chunk.train()
        return results
