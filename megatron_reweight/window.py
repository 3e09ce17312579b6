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
losses again exactly; the report's `window loss drift` (the step's largest |pass 2 - pass 1|
per-sample loss) shows it. The loss_func knows which pass it serves (`phase`), and a last
pipeline stage that recorded no losses, or has no weights in pass 2, stops the step rather
than train on nothing. `refusal` names what cannot be replayed between the passes. The price is one forward pass per step. With one micro-batch per step the two
windows are the same samples and the step runs once, as in the micro-batch window.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist

from megatron_reweight.loss import SampleLosses, SampleReweighter, gather_losses

logger = logging.getLogger(__name__)


def refusal(
    *, cuda_graphs: str | None = None, fp8_delayed_scaling: bool = False, interleaved_param_gather: bool = False
) -> str | None:
    """Why a run cannot use the global-batch window (None: it can). The second pass must
    recompute the first pass's losses from the same state, so nothing the forward-only pass
    changes may differ between them:
    * CUDA graphs (`cuda_graphs`: megatron-core's --cuda-graph-impl, local or full-iteration, or
      transformer_engine): captured graphs replay training-mode forward-backward work and a
      fixed random offset that a forward-only pass in between would not follow;
    * FP8 with delayed scaling: the forward-only pass appends to the amax history, so the second
      pass quantises with other scales;
    * the interleaved pipeline schedule with --overlap-param-gather: the forward-only pass runs
      without the schedule's parameter prefetch, and the second pass all-gathers every
      parameter again.
    MoE's expert-bias token counting and auxiliary losses need no refusal: the router updates
    them only with grad enabled, so the forward-only pass leaves them alone."""
    if cuda_graphs not in (None, "none"):
        return (
            f"CUDA graphs (--cuda-graph-impl {cuda_graphs}) replay captured training work and random offsets that "
            "the window's forward-only pass cannot replay"
        )
    if fp8_delayed_scaling:
        return (
            "FP8 delayed scaling (--fp8-recipe delayed): the window's forward-only pass updates the amax history, "
            "so the second pass would quantise with other scales; use another --fp8-recipe"
        )
    if interleaved_param_gather:
        return (
            "the interleaved pipeline schedule with --overlap-param-gather: the window's forward-only pass runs "
            "without the schedule's parameter prefetch and the second pass would all-gather every parameter again; "
            "drop --overlap-param-gather or the virtual pipeline stages"
        )
    return None


def forward_backward(
    reweighter: SampleReweighter, forward_backward_func, *, forward_step_func, data_iterator, model,
    num_microbatches: int, forward_only: bool = False, **schedule_kwargs,
):  # fmt: skip
    """`forward_backward_func(...)` with the weighting window of `reweighter.config.window`
    (a forward-only call runs as it is). The forward step must return `reweighter.loss_func`
    (bound to its batch) as its loss function, in both passes. Returns the schedule's
    per-micro-batch reports."""

    def run(iterator, forward_only: bool):
        return forward_backward_func(
            forward_step_func=forward_step_func, data_iterator=iterator, model=model,
            num_microbatches=num_microbatches, forward_only=forward_only, **schedule_kwargs,
        )  # fmt: skip

    if forward_only:
        return run(data_iterator, forward_only=True)
    reweighter.microbatches_per_step, reweighter.step_nonfinite = num_microbatches, 0
    skip_nonfinite = reweighter.config.skip_nonfinite_samples
    if skip_nonfinite:
        _take_over_nonfinite_grad_check(model)
    if reweighter.config.window == "micro-batch":
        reports = run(data_iterator, forward_only=False)
    else:
        reports = _global_batch_step(reweighter, run, data_iterator, num_microbatches)
    reweighter.skip_update = skip_nonfinite and _skip_nonfinite_step(reweighter, model)
    return reports


def _global_batch_step(reweighter: SampleReweighter, run, data_iterator, num_microbatches: int):
    window = _GlobalBatchWindow(reweighter, num_microbatches, _is_last_stage())
    reweighter.window = window
    try:
        if num_microbatches == 1:  # the window is one micro-batch across DP: weighed as it comes
            window.phase = SINGLE
            return run(data_iterator, forward_only=False)
        randomness = _RandomState()
        recorded = _record(data_iterator)
        window.phase = RECORD
        with torch.no_grad():
            run(recorded, forward_only=True)
        window.weigh()
        randomness.restore()
        window.phase = APPLY
        reports = run(_replay(recorded), forward_only=False)
        window.check_applied()
        return reports
    finally:
        reweighter.window = None


def _take_over_nonfinite_grad_check(model) -> None:
    """With skip_nonfinite_samples, the step-level decision below replaces megatron DDP's NaN/Inf
    check of each gradient bucket, which would stop the run inside the backward pass before a
    step with a non-finite sample could be skipped."""
    for chunk in model:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is not None:
            ddp_config.check_for_nan_in_grad = False


def _skip_nonfinite_step(reweighter: SampleReweighter, model) -> bool:
    """Whether any sample of the step, on any rank, had a non-finite loss: then the step's
    gradients are zeroed and its update is to be skipped (as fp16 loss scaling skips a step).
    Without such a sample, non-finite gradients stop the run as megatron's check would have
    (--check-for-nan-in-loss-and-grad). Collective over all ranks."""
    from megatron.core import parallel_state
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    # Each sample is counted once: TP and CP peers hold the same samples.
    counted_elsewhere = parallel_state.model_parallel_is_initialized() and (
        parallel_state.get_tensor_model_parallel_rank() != 0 or parallel_state.get_context_parallel_rank() != 0
    )
    grads = [_main_grad(p) for chunk in model for p in chunk.parameters() if _main_grad(p) is not None]
    device = grads[0].device if grads else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    samples = torch.tensor(0.0 if counted_elsewhere else float(reweighter.step_nonfinite), device=device)
    grads_finite = torch.stack([g.isfinite().all() for g in grads]).all() if grads else torch.tensor(True, device=device)
    flags = torch.stack([samples, (~grads_finite).float()])
    if dist.is_initialized():
        dist.all_reduce(flags)
    nonfinite_samples, nonfinite_grads = int(flags[0]), bool(flags[1] > 0)
    if nonfinite_samples:
        for chunk in model:
            if hasattr(chunk, "zero_grad_buffer"):
                chunk.zero_grad_buffer()
            else:
                chunk.zero_grad(set_to_none=False)
        reweighter.skipped_updates += 1
        if not dist.is_initialized() or dist.get_rank() == 0:
            logger.warning(
                f"iteration {reweighter.step + 1}: update skipped, {nonfinite_samples} sample(s) with a non-finite loss "
                f"({reweighter.skipped_updates} update(s) skipped so far; --reweight-skip-nonfinite-samples)"
            )
        return True
    if nonfinite_grads and reweighter.checks is not None and reweighter.checks.nan_and_inf:
        get_rerun_state_machine().validate_result(
            result=torch.tensor(math.nan),
            rejection_func=torch.isnan,
            message="found NaN or Inf in the gradients of a step whose sample losses were all finite",
            tolerance=0.0,
            fatal=True,
        )
    return False


def _main_grad(param: torch.nn.Parameter) -> torch.Tensor | None:
    """The gradient megatron's optimizer steps with: DDP's main_grad, else .grad."""
    main_grad = getattr(param, "main_grad", None)
    return main_grad if main_grad is not None else param.grad


def _is_last_stage() -> bool:
    """Whether this rank computes losses: the last pipeline stage (any rank without model parallelism)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return True
    return parallel_state.is_pipeline_last_stage(ignore_virtual=True)


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
        # A state tensor is replaced when the tracker forks, so keeping it keeps its value. A
        # graph-safe generator changes in place and may be registered with CUDA graphs: keep the
        # object and a copy of its state, to restore into it.
        self.tracked = {
            name: state if isinstance(state, torch.Generator) else state.clone()
            for name, state in self.tracker.get_states().items()
        }
        self.generator_states = {
            name: state.get_state() for name, state in self.tracked.items() if isinstance(state, torch.Generator)
        }

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)
        for name, state in self.generator_states.items():
            self.tracked[name].set_state(state)
        self.tracker.set_states(dict(self.tracked))


# The phases of a global-batch step, as the loss_func sees them.
SINGLE = "one micro-batch"  # the whole window in one micro-batch: weighed as it comes
RECORD = "forward-only pass"  # pass 1: record the losses
APPLY = "forward-backward pass"  # pass 2: apply the window's weights


class _GlobalBatchWindow:
    """The loss_func side of one global-batch step: records losses in pass 1, applies the
    window's weights in pass 2 (micro-batches come to the loss_func in order 0..M-1)."""

    def __init__(self, reweighter: SampleReweighter, num_microbatches: int, last_stage: bool):
        self.reweighter = reweighter
        self.num_microbatches = num_microbatches
        self.last_stage = last_stage
        self.phase: str | None = None  # set by forward_backward before each pass
        self.recorded: list[torch.Tensor] = []  # pass 1: each micro-batch's local losses [b]
        self.local_weights: torch.Tensor | None = None  # [M, b] once weighed
        self.drift = []  # pass 2: each micro-batch's max |pass 2 - pass 1| loss
        self.applied = 0

    def loss_func(self, output_tensor, loss_mask, domain_ids, pieces: SampleLosses):
        if self.phase == SINGLE:
            return self.reweighter.micro_batch_loss(output_tensor, loss_mask, domain_ids, pieces)
        if self.phase == RECORD:
            self.recorded.append(pieces.losses)
            return pieces.local_sums.new_zeros(()), torch.ones((), dtype=torch.int, device=loss_mask.device), {}
        if self.phase != APPLY or self.local_weights is None:
            raise RuntimeError(
                f"the global-batch window has no weights for this micro-batch ({self.phase or 'no pass'}): "
                "its forward-only pass recorded no losses on this rank"
            )
        m = self.applied
        self.applied += 1
        loss, num_tokens, report = self.reweighter.weighted_loss(
            output_tensor, loss_mask, domain_ids, pieces, self.local_weights[m], self.num_microbatches
        )
        self.drift.append(_max_difference(pieces.losses, self.recorded[m]))
        report["window loss drift"] = self._drift_report(last=self.applied == self.num_microbatches)
        return loss, num_tokens, report

    def _drift_report(self, last: bool) -> torch.Tensor:
        """[value, count]: the step's largest drift over its micro-batches and DP ranks, in the last
        micro-batch's report of every rank ([0, 0] in the others), so that the sum over micro-batches and
        DP x CP ranks divided by the count is that maximum."""
        if not last:
            return torch.zeros(2, device=self.drift[-1].device)
        drift = torch.stack(self.drift).max()
        group = self.reweighter.data_parallel_group  # CP ranks hold the same losses
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(drift, op=dist.ReduceOp.MAX, group=group)
        return torch.stack([drift, torch.ones_like(drift)])

    def weigh(self) -> None:
        """After pass 1, on the last pipeline stage (other stages record nothing): gather the
        window's losses over DP in the sampler's order (micro-batch, DP rank, sample) and weigh."""
        if not self.last_stage:
            return
        if len(self.recorded) != self.num_microbatches:
            raise RuntimeError(
                f"the global-batch window's forward-only pass recorded {len(self.recorded)} of "
                f"{self.num_microbatches} micro-batches' losses on this last pipeline stage: the forward step must "
                "return this reweighter's loss_func for every micro-batch, also without grad"
            )
        local = torch.stack(self.recorded)  # [M, b]
        gathered = gather_losses(local.flatten(), self.reweighter.data_parallel_group)
        window = gathered.view(-1, *local.shape).transpose(0, 1)  # [M, DP, b]
        weights = self.reweighter.weigh(window.flatten()).view(window.shape)
        self.local_weights = weights[:, self.reweighter.data_parallel_rank()]

    def check_applied(self) -> None:
        """After pass 2: every recorded micro-batch got its weights."""
        if self.last_stage and self.applied != self.num_microbatches:
            raise RuntimeError(
                f"the global-batch window applied weights to {self.applied} of {self.num_microbatches} micro-batches "
                "on this last pipeline stage: the forward step must return this reweighter's loss_func for every one"
            )


def _max_difference(losses: torch.Tensor, recorded: torch.Tensor) -> torch.Tensor:
    """max |losses - recorded| (float32 scalar); an invalid (NaN) sample matches only a NaN."""
    both_invalid = losses.isnan() & recorded.isnan()
    difference = torch.where(both_invalid, 0.0, (losses - recorded).abs()).nan_to_num(nan=math.inf)
    return difference.max().float()
