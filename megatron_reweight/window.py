"""The global-batch weighting window: each step's weights are compute_weights on all of its
per-sample losses at once (every micro-batch, every data-parallel rank), as the papers
weighted a whole minibatch.

Megatron's schedules run the backward pass of a micro-batch before the forward pass of a
later one, so no loss_func knows the losses of the whole step in time. `forward_backward`
runs a step in two passes over the same micro-batches instead (pass 2 reads again what pass 1
read from the data iterator):
1. forward only, without an autograd graph, through the same schedule (every pipeline stage
   takes part): the loss_func records each sample's loss; the last stage all-gathers them over
   the data-parallel group (never TP, PP or CP) and weighs them together;
2. the normal forward-backward pass: each loss_func applies the weights of its samples.
Around pass 1 the random state (CPU, this CUDA device, megatron's model-parallel RNG tracker)
is saved and then restored, so dropout draws the same masks and pass 2 computes pass 1's
losses again exactly; the report's `window loss drift` (max |pass 2 - pass 1| per-sample
loss) shows it. The price is one forward pass per step. With one micro-batch per step the two
windows are the same samples and the step runs once, as in the micro-batch window.
"""

from __future__ import annotations

import math

import torch

from megatron_reweight.loss import SampleLosses, SampleReweighter, gather_losses


def forward_backward(
    reweighter: SampleReweighter, forward_backward_func, *, forward_step_func, data_iterator, model,
    num_microbatches: int, **schedule_kwargs,
):  # fmt: skip
    """`forward_backward_func(..., forward_only=False)` with the weighting window of
    `reweighter.config.window`. The forward step must return `reweighter.loss_func` (bound
    to its batch) as its loss function. Returns the schedule's per-micro-batch reports."""

    def run(iterator, forward_only: bool):
        return forward_backward_func(
            forward_step_func=forward_step_func, data_iterator=iterator, model=model,
            num_microbatches=num_microbatches, forward_only=forward_only, **schedule_kwargs,
        )  # fmt: skip

    if reweighter.config.window == "micro-batch":
        return run(data_iterator, forward_only=False)
    window = _GlobalBatchWindow(reweighter, num_microbatches)
    reweighter.window = window
    try:
        if num_microbatches == 1:  # the window is one micro-batch across DP: weighed as it comes
            return run(data_iterator, forward_only=False)
        randomness = _RandomState()
        recorded = _record(data_iterator)
        with torch.no_grad():
            run(recorded, forward_only=True)
        window.weigh()
        randomness.restore()
        return run(_replay(recorded), forward_only=False)
    finally:
        reweighter.window = None


class _Recorded:
    """A data iterator that keeps what pass 1 reads from it, for pass 2 to read again."""

    def __init__(self, source):
        self.source = source
        self.items = []

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.source)
        self.items.append(item)
        return item


def _record(data_iterator):
    """Wrap the schedule's data iterator: None (no data on this stage), one iterator, or a list
    of them (one per virtual pipeline chunk)."""
    if isinstance(data_iterator, list):
        return [_record(chunk) for chunk in data_iterator]
    return None if data_iterator is None else _Recorded(data_iterator)


def _replay(recorded):
    if isinstance(recorded, list):
        return [_replay(chunk) for chunk in recorded]
    return None if recorded is None else iter(recorded.items)


class _RandomState:
    """The generators a forward pass may draw from: the CPU's, this CUDA device's, and the
    states of megatron's model-parallel RNG tracker (saved as Megatron-LM's checkpoints do)."""

    def __init__(self):
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        self.tracker = get_cuda_rng_tracker()
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
        # Tensors are replaced when the tracker forks; graph-safe generators change in place.
        self.tracked = {
            name: state.clone() if isinstance(state, torch.Tensor) else state.clone_state()
            for name, state in self.tracker.get_states().items()
        }

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)
        self.tracker.set_states(self.tracked)


class _GlobalBatchWindow:
    """The loss_func side of one global-batch step: records losses in pass 1, applies the
    window's weights in pass 2 (micro-batches come to the loss_func in order 0..M-1)."""

    def __init__(self, reweighter: SampleReweighter, num_microbatches: int):
        self.reweighter = reweighter
        self.num_microbatches = num_microbatches
        self.recorded: list[torch.Tensor] = []  # pass 1: each micro-batch's local losses [b]
        self.local_weights: torch.Tensor | None = None  # [M, b] once weighed
        self.applied = 0

    def loss_func(self, output_tensor, loss_mask, domain_ids, pieces: SampleLosses):
        if self.num_microbatches == 1:
            return self.reweighter.micro_batch_loss(output_tensor, loss_mask, domain_ids, pieces)
        if self.local_weights is None:  # pass 1
            self.recorded.append(pieces.losses)
            return pieces.local_sums.new_zeros(()), torch.ones((), dtype=torch.int, device=loss_mask.device), {}
        m = self.applied
        self.applied += 1
        loss, num_tokens, report = self.reweighter.weighted_loss(
            output_tensor, loss_mask, domain_ids, pieces, self.local_weights[m], self.num_microbatches
        )
        drift = _max_difference(pieces.losses, self.recorded[m])
        report["window loss drift"] = torch.stack([drift, torch.ones_like(drift)])
        return loss, num_tokens, report

    def weigh(self) -> None:
        """After pass 1, on the last pipeline stage (other stages record nothing): gather the
        window's losses over DP in the sampler's order (micro-batch, DP rank, sample) and weigh."""
        if not self.recorded:
            return
        if len(self.recorded) != self.num_microbatches:
            raise RuntimeError(
                f"the global-batch window saw {len(self.recorded)} of {self.num_microbatches} micro-batches' "
                "losses: the forward step must return this reweighter's loss_func for every micro-batch"
            )
        local = torch.stack(self.recorded)  # [M, b]
        gathered = gather_losses(local.flatten(), self.reweighter.data_parallel_group)
        window = gathered.view(-1, *local.shape).transpose(0, 1)  # [M, DP, b]
        weights = self.reweighter.weigh(window.flatten()).view(window.shape)
        self.local_weights = weights[:, self.reweighter.data_parallel_rank()]


def _max_difference(losses: torch.Tensor, recorded: torch.Tensor) -> torch.Tensor:
    """max |losses - recorded| (float32 scalar); an invalid (NaN) sample matches only a NaN."""
    both_invalid = losses.isnan() & recorded.isnan()
    difference = torch.where(both_invalid, 0.0, (losses - recorded).abs()).nan_to_num(nan=math.inf)
    return difference.max().float()
