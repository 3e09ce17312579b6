"""Activation recomputation changes memory, not numbers: the same tiny run with full recomputation
of every layer (uniform) and of the first layer only (block) logs bitwise the same losses, weighted
losses and gradient norms at every step as without. On the CPU the recomputed forward pass
repeats the same operations on the same inputs (and the same dropout masks, from the restored RNG
states), so the gradients are the same bits; a step's loss after the first depends on all earlier
gradients. The weighting window is the global batch over 2 micro-batches, so the forward-only pass
and the training pass both run with recomputation. The reweighting equivalence with recomputation,
against a single-process reference: tests/integration/test_distributed_equivalence.py."""

from __future__ import annotations

import pytest

from tests.helpers.pretrain import SMALL_MODEL, read_metrics, run

RUN = SMALL_MODEL + [
    "--mock-data", "--vocab-size", "256", "--train-iters", "4", "--log-interval", "1", "--eval-iters", "0",
    "--reweight-window", "global-batch", "--reweight-r-warmup-steps", "0", "--reweight-r", "0.3",
    "--global-batch-size", "4",
]  # fmt: skip
RECOMPUTE = {
    "none": [],
    "full, uniform": ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
    "full, block of 1 of 2 layers": [
        "--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1",
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    records, headers = {}, {}
    for name, flags in RECOMPUTE.items():
        metrics = tmp_path_factory.mktemp("recompute") / "metrics.jsonl"
        headers[name] = next(line for line in run(1, RUN + flags + ["--metrics-file", str(metrics)]).stdout.splitlines()
                             if line.startswith("pretrain_llama: layout estimate:"))  # fmt: skip
        train, _ = read_metrics(metrics)
        records[name] = [(train[i]["lm loss"], train[i]["weighted loss"], train[i]["grad norm"]) for i in sorted(train)]
    return records, headers


@pytest.mark.parametrize("recompute", [name for name in RECOMPUTE if name != "none"])
def test_recomputation_gives_bitwise_the_same_run(logged, recompute):
    records, _ = logged
    assert len(records["none"]) == 4
    assert records[recompute] == records["none"]


def test_the_run_header_prints_the_layouts_estimate(logged):
    """Megatron-LM's memory estimate and the step cost (megatron_reweight/plan.py) of the run's own
    layout: 2 micro-batches per step, so the global-batch window needs the forward-only pass."""
    _, headers = logged
    for header in headers.values():
        assert "Megatron-LM's formula" in header and "forward-only pass +33%" in header, header
        assert "global-batch window through the forward-only pass" in header
    assert "recomputation +0%" in headers["none"]
    # A third of the recomputed layers' share of the FLOPs (with a 256-token vocabulary, 86% are in the layers).
    assert "recomputation +14%" in headers["full, block of 1 of 2 layers"]
    assert "recomputation +28%" in headers["full, uniform"]
