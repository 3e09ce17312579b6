"""pretrain_llama.py end to end on CPU (gloo, torchrun): training with DP, TP, CP and PP,
per-domain validation, TensorBoard and the metrics file."""

import math
import re

import pytest

from tests.helpers.pretrain import SMALL_MODEL, data_args, make_corpus, read_metrics, run

ITERS = 16
COMMON = ["--train-iters", str(ITERS), "--log-interval", "1", "--eval-interval", "8", "--eval-iters", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def single_process(corpus, tmp_path_factory):
    """The reference: one process (no torchrun), no model parallelism, as a user's first run on
    prepared data: no --save, no --data-cache-path."""
    out = tmp_path_factory.mktemp("single")
    result = run(1, SMALL_MODEL + data_args(corpus, None) + COMMON + ["--metrics-file", str(out / "m.jsonl")])
    return result, *read_metrics(out / "m.jsonl")


def test_a_plain_run_prints_nothing_on_stderr_and_one_data_cache_note(single_process):
    """megatron-core's notices that ask nothing of the user are filtered (here: each domain's
    validation set is a blend of its one prefix, and the blend's indices have no cache directory,
    which the run says once itself); Python warnings are off in these runs."""
    result, _, _ = single_process
    assert result.stderr == ""
    assert result.stdout.count("note: no --data-cache-path") == 1


def _mean_weight(train: dict, first: int, last: int, domain: str) -> float:
    """A domain's mean weight x b over iterations first..last from the per-step train records
    (each step's mean weighted by the domain's samples in that step)."""
    records = [train[i] for i in range(first, last + 1)]
    samples = sum(r[f"samples/{domain}"] for r in records)
    return sum(r.get(f"weight x batch/{domain}", 0.0) * r[f"samples/{domain}"] for r in records) / samples


def test_evaluations_and_the_run_summary_show_each_domains_mean_weight(single_process):
    """Each validation line puts every domain's mean weight x b since the previous evaluation beside
    its perplexity; the run ends with a summary. Both agree with the per-step metrics recorded."""
    result, train, evals = single_process
    domains = ["repeat", "markov", "noise"]
    assert all(sum(train[i][f"samples/{d}"] for d in domains) == 8 for i in train)  # the global batch
    for iteration, first in ((8, 1), (ITERS, 9)):
        line = next(x for x in result.stdout.splitlines() if x.startswith(f"validation at iteration {iteration}:"))
        assert line.endswith(f"w*b: mean weight x b over iterations {first}-{iteration}")
        assert evals[iteration]["weights from iteration"] == first
        for domain in domains:
            expected = _mean_weight(train, first, iteration, domain)
            record = evals[iteration]["domains"][domain]
            assert record["weight x batch"] == pytest.approx(expected, rel=1e-5)
            shown = re.search(rf"{domain} [0-9.]+ \(ppl ([0-9.]+), w\*b ([0-9.]+)\)", line)
            assert float(shown[1]) == pytest.approx(record["ppl"], abs=0.006)
            assert float(shown[2]) == pytest.approx(expected, abs=6e-4)

    summary = result.stdout[result.stdout.index("run summary:") :].splitlines()
    assert summary[0] == (
        f"run summary: completed at iteration {ITERS}/{ITERS} in {summary[0].split(' in ')[1].split('s:')[0]}s: "
        f"{ITERS * 8} samples, {ITERS * 8 * 64} tokens, final training lm loss {train[ITERS]['lm loss']:.4f}"
    )
    assert f"mean weight x b (w*b) over iterations 1-{ITERS}" in summary[1]
    rows = {line.split()[0]: line.split()[1:] for line in summary[3:6]}
    assert sorted(rows) == sorted(domains)
    for domain, (loss, ppl, weight) in rows.items():
        final = evals[ITERS]["domains"][domain]
        assert (loss, ppl) == (f"{final['loss']:.4f}", f"{final['ppl']:.2f}")
        assert float(weight) == pytest.approx(_mean_weight(train, 1, ITERS, domain), abs=6e-4)
    assert float(rows["noise"][2]) > 1 > float(rows["markov"][2])  # as the per-step records show
    assert summary[6].startswith("  checkpoint: none (no --save) | metrics: ") and summary[6].endswith("m.jsonl")


def test_data_parallel_run_learns_and_logs_everything(corpus, tmp_path):
    tensorboard = tmp_path / "tb"
    args = SMALL_MODEL + data_args(corpus, tmp_path / "cache") + COMMON + ["--tensorboard-dir", str(tensorboard)]
    result = run(2, args)
    train, evals = read_metrics(tensorboard / "metrics.jsonl")

    assert sorted(train) == list(range(1, ITERS + 1))
    first, last = train[1], train[ITERS]
    assert last["lm loss"] < first["lm loss"] - 0.3, (first["lm loss"], last["lm loss"])
    assert first["lm loss"] == pytest.approx(math.log(256), abs=0.15)  # an untrained model: ~uniform
    # LinUpper after the r warm-up (2 steps at r = 100): weights differ from uniform and the
    # weighted loss leans to the hard samples.
    assert train[1]["r"] == 100 and train[ITERS]["r"] == 0.4
    assert train[1]["max weight x batch"] == pytest.approx(1.0, abs=0.05)
    late = [train[i] for i in range(4, ITERS + 1)]
    assert all(t["max weight x batch"] > 1.05 and t["min weight x batch"] < 0.95 for t in late)
    assert all(t["weighted loss"] > t["lm loss"] for t in late)
    # Per domain: the unlearnable noise gets more than its share; the Markov chain, whose small
    # token range is learnt first, gets less.
    assert all(t["weight x batch/noise"] > 1 > t["weight x batch/markov"] for t in late)
    assert all(sum(t[f"samples/{d}"] for d in ("repeat", "markov", "noise")) == 8 for t in train.values())
    assert all(t["tokens per s"] > 0 and t["step time s"] > 0 and t["lr"] > 0 for t in late)

    # Per-domain validation (held-out documents of each prefix), at 8 and 16.
    assert sorted(evals) == [8, ITERS]
    for record in evals.values():
        assert sorted(record["domains"]) == ["markov", "noise", "repeat"]
        for domain in record["domains"].values():
            assert domain["ppl"] == pytest.approx(math.exp(domain["loss"]), rel=1e-6) and domain["tokens"] == 8 * 64
    # The noise domain (uniform over 160 tokens) cannot go below log(160); the others can.
    final = evals[ITERS]["domains"]
    assert final["noise"]["loss"] > math.log(160) - 0.05
    assert final["markov"]["loss"] < evals[8]["domains"]["markov"]["loss"]
    assert "validation at iteration 16: repeat" in result.stdout and "DP 2" in result.stdout

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/lm loss",
        "train/weighted loss",
        "train/r",
        "train/tokens per s",
        "train/weight x batch/noise",
        "valid/noise/ppl",
        "valid/all/loss",
    } <= tags
    assert [e.step for e in events.Scalars("train/lm loss")] == list(range(1, ITERS + 1))
    assert events.Scalars("train/lm loss")[-1].value == pytest.approx(last["lm loss"], rel=1e-6)


@pytest.mark.parametrize(
    "layout",
    [
        ["--tensor-model-parallel-size", "2"],
        ["--context-parallel-size", "2"],
        ["--context-parallel-size", "2", "--calculate-per-token-loss"],
    ],
    ids=["tp2", "cp2", "cp2-per-token-loss"],
)
def test_model_parallel_run_matches_one_process(layout, corpus, tmp_path, single_process):
    """TP and CP shard the same model (CPU initialisation makes the full weights and splits
    them): the losses must match the one-process run up to float summation order. Megatron's
    per-token loss mode (gradients divided by the all-reduced token count) gives the same
    weighted gradient, so the same trajectory."""
    _, reference, reference_evals = single_process
    metrics = tmp_path / "m.jsonl"
    run(2, SMALL_MODEL + data_args(corpus, tmp_path / "cache") + COMMON + layout + ["--metrics-file", str(metrics)])
    train, evals = read_metrics(metrics)
    for iteration in range(1, ITERS + 1):
        for key in ("lm loss", "weighted loss", "max weight x batch", "weight x batch/markov", "samples/markov"):
            assert train[iteration][key] == pytest.approx(reference[iteration][key], rel=2e-4, abs=2e-4), (
                iteration,
                key,
            )
    for domain, values in evals[ITERS]["domains"].items():
        assert values["loss"] == pytest.approx(reference_evals[ITERS]["domains"][domain]["loss"], rel=2e-4)


def test_pipeline_parallel_run_learns(corpus, tmp_path):
    metrics = tmp_path / "m.jsonl"
    result = run(2, SMALL_MODEL + data_args(corpus, tmp_path / "cache") + COMMON + ["--pipeline-model-parallel-size", "2",
                                                                                     "--metrics-file", str(metrics)])  # fmt: skip
    train, evals = read_metrics(metrics)
    assert "PP 2" in result.stdout
    assert train[ITERS]["lm loss"] < train[1]["lm loss"] - 0.3
    assert sorted(evals[ITERS]["domains"]) == ["markov", "noise", "repeat"]
