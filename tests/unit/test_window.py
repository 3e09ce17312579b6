"""The weighting window's in-process checks: the window setting is checked at start-up, a
global-batch reweighter refuses to weigh inside a schedule run without its two passes, and
pass 2 reads exactly what pass 1 read (one data iterator, or one per virtual pipeline chunk).
The weights and gradients under every layout: tests/integration/test_distributed_equivalence.py."""

import pytest
import torch

from megatron_reweight import ReweightConfig, SampleReweighter
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
