"""The weighted loss under every parallel layout equals a single-process reference.

The real tiny Llama GPTModel runs through megatron's schedules, DDP and
finalize_model_grads under torchrun (gloo). Each layout checks, on every rank, for both
weighting windows and every loss mode (calculate_per_token_loss on/off, average_in_collective
on/off), that the weights equal those one process computes on the same samples and that the
gradient shards equal the reference gradient: (1/M) sum_m sum_i w_i f_i with weights per
micro-batch across DP, sum_i w_i f_i with weights over the whole global batch. Negative
controls: the per-micro-batch window's weights differ from the global-batch window's; with
dropout on, two plain forward passes differ while the global-batch window's two passes agree
exactly (with activation recomputation too: the recomputed forward replays the same masks).
See tests/integration/workers/equivalence.py.
"""

from pathlib import Path

import pytest

from tests.helpers.distributed import torchrun

WORKER = Path(__file__).parent / "workers" / "equivalence.py"


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    """Reference runs keyed by (microbatches, strategy), computed once each."""
    cache = {}

    def get(microbatches: int, strategy: str) -> Path:
        key = (microbatches, strategy)
        if key not in cache:
            workdir = tmp_path_factory.mktemp(f"reference_{microbatches}_{strategy}")
            torchrun(1, WORKER, "--phase", "reference", "--workdir", str(workdir), *_options(microbatches, strategy))
            cache[key] = workdir
        return cache[key]

    return get


def _options(microbatches: int, strategy: str) -> list[str]:
    return ["--microbatches", str(microbatches), "--strategy", strategy, "--data-parallel", "2"]


@pytest.mark.parametrize(
    "name, layout, processes, microbatches, strategy",
    [
        ("DP2", [], 2, 2, "linupper"),
        ("DP2, 3 microbatches, midranking", [], 2, 3, "midranking"),
        ("TP2xDP2 + negative control", ["--tp", "2", "--negative-control"], 4, 2, "linupper"),
        ("PP2xDP2", ["--pp", "2"], 4, 2, "linupper"),
        ("CP2xDP2", ["--cp", "2"], 4, 2, "linupper"),
        # Activation recomputation (of 1 of 2 layers, and of every layer), dropout included.
        ("DP2, block recomputation", ["--recompute-method", "block"], 2, 2, "linupper"),
        ("PP2xDP2, uniform recomputation", ["--pp", "2", "--recompute-method", "uniform"], 4, 2, "linupper"),
    ],
)
def test_layout_matches_single_process_reference(reference_dir, name, layout, processes, microbatches, strategy):
    workdir = reference_dir(microbatches, strategy)
    result = torchrun(processes, WORKER, "--phase", "layout", "--workdir", str(workdir),
                      *_options(microbatches, strategy), *layout)  # fmt: skip
    assert result.stdout.count("weights and gradients match the reference") == processes
