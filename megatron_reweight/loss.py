"""The weighted loss inside Megatron-Core's forward step.

Per microbatch, on the last pipeline stage:
1. per-sample losses f_i = (sum of unmasked per-token losses) / (unmasked tokens),
   with sums and counts added over the context-parallel group first, so every CP
   rank sees each sample's full-sequence loss;
2. the f_i are all-gathered over the data-parallel group only (never TP or PP:
   TP ranks hold identical losses, PP stages hold none);
3. weights w_i = compute_weights(gathered f, ...) on the whole gathered batch
   (micro-batch size x DP samples); each rank keeps its own slice;
4. the returned loss is scaled so that after Megatron's schedule and DDP the
   gradient is exactly  (1/M) sum_microbatches sum_i w_i grad f_i.

The scaling, for both `calculate_per_token_loss` modes: we return
num_tokens = 1 and loss = DP * CP * sum_{i local} w_i * s_i / N_i, where s_i is
this CP rank's share of the token-loss sum and N_i the sample's full token count.
* per-token loss off: the schedule divides by clamp(num_tokens, 1) = 1 and by M,
  DDP averages over the DP x CP group (pre-scaling 1/size, or AVG in the
  collective): gradient = (1/M) sum w_i grad f_i.
* per-token loss on: the schedule keeps the raw loss, DDP sums, and
  finalize_model_grads divides by the all-reduced token count, here DP * CP * M:
  the same gradient.
In the global-batch window (megatron_reweight.window) the weights of all M micro-batches
sum to 1 together and the loss is also multiplied by M: gradient = sum_i w_i grad f_i over
the global batch.
Weights are detached. A sample with no unmasked token or a non-finite loss gets
weight 0 and its tokens pass no gradient. With `LossChecks` (Megatron-LM's
--check-for-nan-in-loss-and-grad) a non-finite loss stops the run as in Megatron, unless
`skip_nonfinite_samples` is set: then such samples are counted and logged, and
megatron_reweight.window skips the step's update (weight 0 alone cannot keep a NaN out of
the gradients when it comes from the sample's activations: 0 x NaN is NaN in backward).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_reweight.loss_checks import LossChecks
from megatron_reweight.settings import setting
from megatron_reweight.strategies import available_strategies, compute_weights
from megatron_reweight.temperature import TemperatureSchedule

# torch 2.13 renamed all_gather_into_tensor (now deprecated, with a warning per call).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

logger = logging.getLogger(__name__)


# The samples weighted together: those of one micro-batch across DP, or the whole global batch
# of the step (all micro-batches, all DP ranks; megatron_reweight.window runs such a step).
WINDOWS = ("micro-batch", "global-batch")


@dataclass
class ReweightConfig:
    strategy: str = setting(
        "uniform",
        f"loss-based sample weighting: one of {', '.join(available_strategies())}",
        flag="--reweight-strategy",
    )
    temperature: TemperatureSchedule = field(default_factory=TemperatureSchedule)
    delta: float = setting(1.0, "losses are normalised into [-delta, delta]", flag="--reweight-delta")
    strategy_kwargs: dict = field(default_factory=dict)  # the strategy's options (arguments.StrategyOptions)
    skip_nonfinite_samples: bool = setting(
        False,
        "skip the update of a step with a NaN/Inf sample loss (its gradients zeroed; logged and counted) and "
        "train on, instead of stopping as --check-for-nan-in-loss-and-grad does",
        flag="--reweight-skip-nonfinite-samples",
    )
    window: str = setting(
        "micro-batch",
        "the samples weighted together: each micro-batch's across data-parallel ranks (micro-batch x DP), or "
        "the step's whole global batch as in the papers (one extra forward pass per step; none with one "
        "micro-batch per step)",
        flag="--reweight-window",
        choices=WINDOWS,
    )
    audit_dir: Path | None = setting(
        None,
        "write every sample's iteration, r, domain, documents, loss and weight x b here (Parquet; read with "
        "megatron-reweight-audit)",
        flag="--reweight-audit-dir",
    )

    def __post_init__(self) -> None:
        # Fail at start-up, not at the first step, on a bad strategy or option.
        compute_weights(torch.zeros(2), self.strategy, r=1.0, delta=self.delta, **self.strategy_kwargs)
        if self.window not in WINDOWS:
            raise ValueError(f"unknown weighting window {self.window!r}; choose one of {', '.join(WINDOWS)}")


def check_megatron_config(calculate_per_token_loss: bool, average_in_collective: bool) -> None:
    """Reject loss-mode combinations whose gradient scaling we cannot make exact."""
    if calculate_per_token_loss and average_in_collective:
        raise ValueError(
            "calculate_per_token_loss=True with average_in_collective=True is not supported "
            "(Megatron's DDP rejects it too): turn one of them off"
        )


@dataclass
class SampleLosses:
    """Per-sample loss pieces of one microbatch on this rank."""

    local_sums: torch.Tensor  # [b] this CP rank's share of the token-loss sums, carries the gradient
    token_counts: torch.Tensor  # [b] full-sequence unmasked token counts (summed over CP)
    losses: torch.Tensor  # [b] detached full-sequence mean losses; NaN where the sample is invalid
    nonfinite: torch.Tensor  # [b] bool: a non-finite loss in an unmasked token (on any CP rank)


def per_sample_losses(
    per_token_loss: torch.Tensor, loss_mask: torch.Tensor, context_parallel_group=None
) -> SampleLosses:
    """Mean loss of each sample over its unmasked tokens, from Megatron's [b, s] tensors."""
    if per_token_loss.dim() != 2 or per_token_loss.shape != loss_mask.shape:
        raise ValueError(
            f"expected per-token losses and loss mask of the same shape [batch, seq], got "
            f"{tuple(per_token_loss.shape)} and {tuple(loss_mask.shape)}"
        )
    mask = loss_mask.bool()
    # torch.where (not a product) so NaN/Inf in masked or faulty tokens cannot leak.
    masked = torch.where(mask, per_token_loss, torch.zeros_like(per_token_loss))
    finite = torch.isfinite(masked)
    # Summed in fp32 at least: thousands of finite fp16/bf16 tokens overflow a half-precision sum.
    sum_dtype = torch.promote_types(masked.dtype, torch.float32)
    local_sums = torch.where(finite, masked, torch.zeros_like(masked)).sum(dim=1, dtype=sum_dtype)
    faulty = (~finite).any(dim=1) | ~torch.isfinite(local_sums)
    pieces = torch.stack([local_sums.detach().float(), mask.sum(dim=1).float(), faulty.float()])
    if context_parallel_group is not None and dist.get_world_size(context_parallel_group) > 1:
        dist.all_reduce(pieces, group=context_parallel_group)
    full_sums, token_counts, faulty = pieces
    nonfinite = (faulty > 0) | ~torch.isfinite(full_sums)
    valid = (token_counts > 0) & ~nonfinite
    losses = torch.where(valid, full_sums / token_counts.clamp(min=1), torch.full_like(full_sums, math.nan))
    # An invalid sample's sum may be infinite, and weight 0 x inf would poison the loss.
    local_sums = torch.where(valid, local_sums, torch.zeros_like(local_sums))
    return SampleLosses(local_sums=local_sums, token_counts=token_counts, losses=losses, nonfinite=nonfinite)


def gather_losses(losses: torch.Tensor, data_parallel_group=None) -> torch.Tensor:
    """All per-sample losses of the microbatch across the data-parallel group, in rank order."""
    if data_parallel_group is None or dist.get_world_size(data_parallel_group) == 1:
        return losses
    gathered = torch.empty(
        dist.get_world_size(data_parallel_group) * losses.numel(), dtype=losses.dtype, device=losses.device
    )
    _all_gather_single(gathered, losses.contiguous(), group=data_parallel_group)
    return gathered


def weight_statistics(
    losses: torch.Tensor, weights: torch.Tensor, reports_per_window: int = 1, microbatches_per_step: int = 1
) -> dict[str, torch.Tensor]:
    """Diagnostics of one gathered batch as Megatron report pairs [value, count].

    Invalid (NaN) samples are left out; a batch without valid samples reports count 0,
    which the reduction skips. `reweight skipped samples` is the step's exact count of
    invalid samples: each of the `reports_per_window` reports of a window carries its share,
    with count 1 / `microbatches_per_step`, so that Megatron's sum over the step's
    micro-batches and DP x CP ranks divided by the count is that total.
    Pure tensor ops: no host-device synchronisation."""
    valid = torch.isfinite(losses)
    count = valid.sum().double()
    has_valid = (count > 0).double()
    w = torch.where(valid, weights.double(), 0.0)
    f = torch.where(valid, losses.double(), 0.0)
    values = {
        "weighted loss": (w * f).sum(),
        "max weight x batch": w.max() * count,  # Theorem 1 assumes <= 2: LinUpper's bound (paper 1, A.5)
        "min weight x batch": torch.where(valid, w, torch.inf).min() * count,
        "effective sample fraction": 1.0 / (w.square().sum() * count),
        "sample loss min": torch.where(valid, f, torch.inf).min(),
        "sample loss mean": f.sum() / count,
        "sample loss max": torch.where(valid, f, -torch.inf).max(),
    }
    pairs = {name: torch.stack([torch.nan_to_num(value) * has_valid, has_valid]) for name, value in values.items()}
    skipped = (losses.numel() - count) / reports_per_window
    pairs["reweight skipped samples"] = torch.stack([skipped, torch.full_like(count, 1 / microbatches_per_step)])
    return {name: pair.float() for name, pair in pairs.items()}


class SampleReweighter:
    """Builds Megatron `loss_func`s that apply loss-based sample weights.

    Set `step` to the current iteration before each forward-backward pass; the
    temperature schedule is read at that step. `checks` runs Megatron-LM's loss checks on
    each microbatch's unweighted loss. `last_losses` / `last_weights` hold the latest
    weighting window (a micro-batch across DP, or the whole global batch), for diagnostics
    such as weight histograms."""

    def __init__(
        self, config: ReweightConfig, data_parallel_group=None, context_parallel_group=None,
        domain_names: list[str] | None = None, checks: LossChecks | None = None,
    ):  # fmt: skip
        self.config = config
        self.checks = checks
        self.data_parallel_group = data_parallel_group
        self.context_parallel_group = context_parallel_group
        self.domain_names = domain_names or []
        self.step = 0  # completed steps: the console numbers the running one step + 1
        self.last_losses: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None
        self.skipped_samples = 0  # non-finite samples skipped on this rank (skip_nonfinite_samples)
        # Set by megatron_reweight.window for each step: its micro-batch count, the non-finite samples
        # this rank saw in it, and whether its update is skipped (skip_nonfinite_samples).
        self.microbatches_per_step = 1
        self.step_nonfinite = 0
        self.skip_update = False
        self.skipped_updates = 0
        self.window = None  # set by megatron_reweight.window while it runs a global-batch step
        self.audited: list | None = None  # a list: every window's (losses, weights) is appended (the audit)

    @classmethod
    def from_parallel_state(
        cls, config: ReweightConfig, domain_names: list[str] | None = None, checks: LossChecks | None = None
    ) -> SampleReweighter:
        from megatron.core import parallel_state

        return cls(
            config,
            data_parallel_group=parallel_state.get_data_parallel_group(with_context_parallel=False),
            context_parallel_group=parallel_state.get_context_parallel_group(),
            domain_names=domain_names,
            checks=checks,
        )

    def _group_size(self, group) -> int:
        return 1 if group is None else dist.get_world_size(group)

    def temperature(self) -> float:
        return self.config.temperature(self.step)

    def loss_func(self, loss_mask: torch.Tensor, output_tensor: torch.Tensor, domain_ids: torch.Tensor | None = None):
        """Megatron 0.16 loss_func contract: returns (loss, num_tokens, report).

        `domain_ids` ([b], a blend's `dataset_id`), with `domain_names` set, adds the mean
        weight x batch of each domain's samples to the report (below 1: down-weighted)."""
        pieces = per_sample_losses(output_tensor, loss_mask, self.context_parallel_group)
        if self.window is not None:
            return self.window.loss_func(output_tensor, loss_mask, domain_ids, pieces)
        if self.config.window != "micro-batch":
            raise RuntimeError(
                f"the {self.config.window} window weighs a whole step at once: run the step with "
                "megatron_reweight.window.forward_backward, not the schedule alone"
            )
        return self.micro_batch_loss(output_tensor, loss_mask, domain_ids, pieces)

    def micro_batch_loss(self, output_tensor, loss_mask, domain_ids, pieces: SampleLosses):
        """Weights over this micro-batch's samples on every DP rank, gathered now."""
        gathered = gather_losses(pieces.losses, self.data_parallel_group)
        weights = self.weigh(gathered)
        batch = pieces.losses.numel()
        dp_rank = self.data_parallel_rank()
        local_weights = weights[dp_rank * batch : (dp_rank + 1) * batch]
        return self.weighted_loss(output_tensor, loss_mask, domain_ids, pieces, local_weights)

    def data_parallel_rank(self) -> int:
        return 0 if self._group_size(self.data_parallel_group) == 1 else dist.get_rank(self.data_parallel_group)

    def weigh(self, window_losses: torch.Tensor) -> torch.Tensor:
        """compute_weights on all losses of a window, at this step's temperature."""
        weights = compute_weights(
            window_losses, self.config.strategy, r=self.temperature(), delta=self.config.delta,
            **self.config.strategy_kwargs,
        )  # fmt: skip
        self.last_losses, self.last_weights = window_losses, weights
        if self.audited is not None:
            self.audited.append((window_losses, weights))
        return weights

    def weighted_loss(
        self, output_tensor, loss_mask, domain_ids, pieces: SampleLosses, local_weights: torch.Tensor,
        microbatches_per_window: int = 1,
    ):  # fmt: skip
        """The loss_func result for this rank's samples with weights from `weigh`. The weights
        of a window spanning several micro-batches sum to 1 over all of them, so the factor
        `microbatches_per_window` undoes the schedule's division by the micro-batch count."""
        scale = microbatches_per_window * self._group_size(self.data_parallel_group)
        scale *= self._group_size(self.context_parallel_group)
        local_weights = local_weights.to(pieces.local_sums.dtype)
        loss = scale * (local_weights * pieces.local_sums / pieces.token_counts.clamp(min=1)).sum()
        num_tokens = torch.ones((), dtype=torch.int, device=loss.device)

        # Unweighted, as Megatron reports it, so runs with and without reweighting compare;
        # over the valid samples only (invalid ones have local sum 0), numerator and denominator alike.
        lm_loss_sum = pieces.local_sums.detach().sum().float()
        lm_loss_tokens = torch.where(torch.isfinite(pieces.losses), loss_mask.sum(dim=1), 0).sum().float()
        self._check(output_tensor, loss_mask, pieces, lm_loss_sum)
        report = {"lm loss": torch.stack([lm_loss_sum, lm_loss_tokens])}
        # [value, count] pairs: Megatron sums them over microbatches and DP x CP ranks, then divides.
        report.update(
            weight_statistics(self.last_losses, self.last_weights, microbatches_per_window, self.microbatches_per_step)
        )
        if self.domain_names and domain_ids is not None:
            weights_x_batch = local_weights * self.last_weights.numel()
            report.update(domain_weights(pieces.losses, weights_x_batch, domain_ids, self.domain_names))
        return loss, num_tokens, report

    def _check(self, output_tensor, loss_mask, pieces: SampleLosses, finite_loss_sum: torch.Tensor) -> None:
        if self.config.skip_nonfinite_samples:
            # One host sync per microbatch, as Megatron's own NaN check costs.
            skipped = int(pieces.nonfinite.sum())
            if skipped:
                self.skipped_samples += skipped
                self.step_nonfinite += skipped
                logger.warning(
                    f"rank {dist.get_rank() if dist.is_initialized() else 0}: skipped {skipped} sample(s) with a "
                    f"non-finite loss at iteration {self.step + 1} ({self.skipped_samples} so far on this rank; "
                    f"--reweight-skip-nonfinite-samples)"
                )
        if self.checks is None:
            return
        if self.config.skip_nonfinite_samples:
            self.checks.validate(finite_loss_sum)
        else:  # the loss pretrain_gpt.py's loss_func checks
            self.checks.validate(torch.sum(output_tensor.view(-1).float() * loss_mask.view(-1).float()))


def domain_weights(
    losses: torch.Tensor, weights_x_batch: torch.Tensor, domain_ids: torch.Tensor, names: list[str]
) -> dict[str, torch.Tensor]:
    """`weight x batch/<domain>` report pairs [sum over the domain's valid samples, count]: every
    domain in every report (count 0 when absent), so the reduction's keys agree across ranks."""
    domains = torch.arange(len(names), device=losses.device)
    # [domains, b]: sample i is a valid sample of domain d.
    member = (domain_ids.to(losses.device)[None, :] == domains[:, None]) & torch.isfinite(losses)[None, :]
    pairs = torch.stack([torch.where(member, weights_x_batch.float(), 0.0).sum(dim=1), member.sum(dim=1).float()], 1)
    return {f"weight x batch/{name}": pair for name, pair in zip(names, pairs)}


def sum_reports(reports: list[dict[str, torch.Tensor]], group=None) -> dict[str, torch.Tensor]:
    """Megatron-LM's reduction of loss_func reports, before the division: each [value, count]
    pair summed over microbatches and the DP x CP group."""
    if not reports:
        return {}
    keys = sorted(set().union(*reports))
    totals = torch.stack([sum(r[k] for r in reports if k in r) for k in keys])
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(totals, group=group)
    return dict(zip(keys, totals))


def reduce_reports(reports: list[dict[str, torch.Tensor]], group=None) -> dict[str, float]:
    """Megatron-LM's reduction of loss_func reports: the summed pairs' value / count."""
    return report_means(sum_reports(reports, group))


def report_means(totals: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each summed [value, count] pair's value / count (pairs with no count left out)."""
    return {key: float(total[0] / total[1]) for key, total in totals.items() if total[1] > 0}
