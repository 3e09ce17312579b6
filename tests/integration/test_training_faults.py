"""Trainer runs fed bad input or driven to diverge: each stops at once with one clear line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.helpers.pretrain import SMALL_MODEL, data_args, make_corpus, read_metrics, run, write_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def error_line(result, exit_code: int = 2) -> str:
    assert result.returncode == exit_code, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stderr.strip().splitlines()[-1]


def test_domain_too_small_for_the_validation_split_is_an_error_not_a_hang(tmp_path):
    """10 documents and Megatron's default --split 969,30,1: the validation split has no document,
    and megatron-core's dataset builder looped forever on it."""
    small = make_corpus(tmp_path / "small", domains=("repeat", "markov"), docs_per_domain=10)
    args = SMALL_MODEL + data_args(small, tmp_path / "cache") + ["--split", "969,30,1", "--train-iters", "3"]
    line = error_line(run(1, args, timeout=120, check=False))
    assert line == (
        f"pretrain_llama.py: error: --data-path prefix {small['prefixes'][0]} (domain repeat): its 10 documents "
        "leave the validation split empty with --split 969,30,1; give the domain more documents or the validation "
        "split a larger share of --split or --eval-iters 0 to train without validation"
    )


def test_token_ids_beyond_the_tokenizer_vocabulary_are_an_error(corpus, tmp_path):
    """The corpus uses ids up to 255; a 200-token tokenizer pads to 256, so this trained silently."""
    small_vocab = write_tokenizer(tmp_path / "tokenizer.json", vocab_size=200)
    args = SMALL_MODEL + data_args({**corpus, "tokenizer": str(small_vocab)}, tmp_path / "cache") + [
        "--train-iters", "3", "--eval-iters", "0",
    ]  # fmt: skip
    line = error_line(run(1, args, check=False))
    assert line.startswith("pretrain_llama.py: error: token id ")
    assert line.endswith(
        "in a sample of domain noise is outside the tokenizer's vocabulary (ids 0..199): the data was tokenised "
        "with another tokenizer; pass the one it was made with as --tokenizer-model, or prepare the data again"
    )


def test_diverged_run_stops_at_the_first_nonfinite_check_and_never_saves_that_step(corpus, tmp_path):
    """--lr 1e3: the loss explodes, the model dies, then a gradient turns NaN."""
    ckpt = tmp_path / "ckpt"
    args = SMALL_MODEL + data_args(corpus, tmp_path / "cache") + [
        "--train-iters", "40", "--eval-iters", "0", "--log-interval", "1", "--lr", "1e3", "--save", str(ckpt),
        "--save-interval", "1",
    ]  # fmt: skip
    line = error_line(run(1, args, check=False), exit_code=1)
    prefix = "pretrain_llama.py: error: iteration "
    assert line.startswith(prefix) and "(--check-for-nan-in-loss-and-grad): training stopped" in line
    failed = int(line[len(prefix) :].split(":")[0])
    assert "found NaN" in line or "found Inf" in line
    assert line.endswith(f"the latest checkpoint is iteration {failed - 1}. Lower --lr or check the data, then "
                         "resume with --load")  # fmt: skip
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(failed - 1)
    assert not list(Path(ckpt).glob(f"iter_{failed:07d}*"))


def test_skip_nonfinite_samples_skips_the_update_of_a_step_with_nan_activations(corpus, tmp_path):
    """A NaN in one sample's hidden states (a forward hook at iteration 3), not in its loss:
    weight 0 cannot keep it out of the gradient (0 x NaN is NaN in the backward pass, and every
    weight's gradient sums over all samples). --reweight-skip-nonfinite-samples skips that step's
    update, and training goes on with finite parameters; without it the NaN check stops the run."""
    worker = Path(__file__).parent / "workers" / "nan_activation.py"
    args = SMALL_MODEL + data_args(corpus, tmp_path / "cache") + [
        "--micro-batch-size", "8", "--train-iters", "6", "--eval-iters", "0", "--log-interval", "1",
        "--metrics-file", str(tmp_path / "m.jsonl"),
    ]  # fmt: skip
    stopped = run(1, ["3", *args], check=False, script=worker)
    assert stopped.returncode == 1 and "iteration 3" in stopped.stderr.strip().splitlines()[-1], stopped.stderr[-3000:]

    skipped = run(1, ["3", *args, "--reweight-skip-nonfinite-samples"], script=worker)
    outcome = json.loads(skipped.stdout.strip().splitlines()[-1])
    assert outcome == {"finite": True, "unchanged_by_poisoned_step": True, "changed_by_next_step": True}
    train, _ = read_metrics(tmp_path / "m.jsonl")
    assert train[3]["skipped iterations"] == 1 and train[3]["reweight skipped samples"] == 1
    for iteration in (4, 5, 6):
        assert math.isfinite(train[iteration]["lm loss"]) and math.isfinite(train[iteration]["grad norm"])
