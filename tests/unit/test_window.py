"""The weighting window's in-process checks: the window setting is checked at start-up, a
global-batch reweighter refuses to weigh inside a schedule run without its two passes, and
pass 2 reads exactly what pass 1 read (one data iterator, or one per virtual pipeline chunk).
The weights and gradients under every layout: tests/integration/test_distributed_equivalence.py."""

import pytest
import torch

from megatron_reweight import ReweightConfig, SampleReweighter, window
from megatron_reweight.loss import reduce_reports
from megatron_reweight.window import _record, _replay


def test_unknown_window_is_refused_at_start_up():
    with pytest.raises(ValueError, match="unknown weighting window 'global'; choose one of micro-batch, global-batch"):
        ReweightConfig(window="global")


def test_global_window_refuses_a_schedule_run_without_its_two_passes():
    reweighter = SampleReweighter(ReweightConfig("linupper", window="global-batch"))
    with pytest.raises(RuntimeError, match="run the step with megatron_reweight.window.forward_backward"):
        reweighter.loss_func(torch.ones(2, 4), torch.rand(2, 4))


def test_pass_two_reads_what_pass_one_read_on_every_pipeline_chunk():
    sources = [iter(range(10)), None, iter("abcdef")]
    recorded = _record(sources)
    # Pass 1 reads 3 micro-batches from the first chunk's iterator, 2 from the last one's.
    first = [next(recorded[0]) for _ in range(3)] + [next(recorded[2]) for _ in range(2)]
    replayed = _replay(recorded)
    assert first == [0, 1, 2, "a", "b"]
    assert [list(replayed[0]), replayed[1], list(replayed[2])] == [[0, 1, 2], None, ["a", "b"]]
    assert (next(sources[0]), next(sources[2])) == (3, "c")  # nothing read beyond pass 1


# --- the window cannot fail quietly -------------------------------------------------------------


def test_window_refuses_a_last_stage_whose_forward_only_pass_recorded_nothing():
    """A forward step that hands back another loss function without grad (as pretrain_gpt.py's own
    does for evaluation) would leave the second pass without weights: a step training on nothing."""
    reweighter = SampleReweighter(ReweightConfig("linupper", window="global-batch"))
    step = window._GlobalBatchWindow(reweighter, num_microbatches=2, last_stage=True)
    step.phase = window.RECORD  # and no loss_func of this reweighter ran
    with pytest.raises(RuntimeError, match="recorded 0 of 2 micro-batches' losses on this last pipeline stage"):
        step.weigh()
    window._GlobalBatchWindow(reweighter, num_microbatches=2, last_stage=False).weigh()  # other stages record none


def test_window_refuses_a_second_pass_without_weights():
    reweighter = SampleReweighter(ReweightConfig("linupper", window="global-batch"))
    step = window._GlobalBatchWindow(reweighter, num_microbatches=2, last_stage=True)
    reweighter.window, step.phase = step, window.APPLY
    with pytest.raises(RuntimeError, match="has no weights for this micro-batch"):
        reweighter.loss_func(torch.ones(2, 4), torch.rand(2, 4))


def test_window_loss_drift_reports_the_largest_of_the_step():
    """Megatron-LM's report reduction (sum of [value, count] pairs / count) gives the step's maximum."""
    reweighter = SampleReweighter(ReweightConfig("linupper", window="global-batch"))
    step = window._GlobalBatchWindow(reweighter, num_microbatches=3, last_stage=True)
    reweighter.window = step
    losses = [torch.rand(2, 4, generator=torch.Generator().manual_seed(m)) + 1 for m in range(3)]
    step.phase = window.RECORD
    for output in losses:
        reweighter.loss_func(torch.ones(2, 4), output)
    step.weigh()
    step.phase = window.APPLY
    drifts = [0.0, 0.25, 0.0625]  # pass 2 differs from pass 1 by these (exact in binary)
    reports = [reweighter.loss_func(torch.ones(2, 4), output + d)[2] for output, d in zip(losses, drifts)]
    assert reduce_reports(reports)["window loss drift"] == pytest.approx(0.25, rel=1e-6)


def test_window_random_state_restores_graph_safe_generators_in_place():
    """A graph-safe generator registered with CUDA graphs must stay the object the tracker holds:
    its state is restored into it, never swapped for a copy."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    before = tracker.get_states()
    generator = torch.Generator().manual_seed(7)
    tracker.set_states({"model-parallel-rng": generator})
    try:
        saved = window._RandomState()
        first = torch.rand(3, generator=generator)
        tracker.set_states({"model-parallel-rng": torch.Generator().manual_seed(8)})  # as a fork may leave it
        saved.restore()
        assert tracker.get_states()["model-parallel-rng"] is generator
        torch.testing.assert_close(torch.rand(3, generator=generator), first)
    finally:
        tracker.set_states(before)
