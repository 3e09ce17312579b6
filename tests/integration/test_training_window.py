"""pretrain_llama.py --reweight-window global-batch weighs all samples of a step at once.

Three short single-process runs, LinUpper after a 2-step warm-up, global batch 8:
* the global-batch window with micro-batch 2: 4 micro-batches, a forward-only pass over them
  first, then the forward-backward pass;
* the micro-batch window with micro-batch 8: one micro-batch is the whole global batch, so the
  weights are the same, computed in a single pass;
* the micro-batch window with micro-batch 2: 4 windows of 2 samples (the negative control).
The first two train the same model: equal losses and weights at every iteration, up to float
summation order. The third departs from them. (The weights and gradients under DP, TP, PP and
CP: test_distributed_equivalence.py.)
"""

import pytest

from tests.helpers.pretrain import SMALL_MODEL, data_args, make_corpus, read_metrics, run

ITERS = 6


def _train(corpus, out, *flags):
    args = SMALL_MODEL + data_args(corpus, out / "cache") + ["--train-iters", str(ITERS), "--log-interval", "1",
            "--eval-iters", "0", "--metrics-file", str(out / "m.jsonl"), *flags]  # fmt: skip
    result = run(1, args)
    return result.stdout, read_metrics(out / "m.jsonl")[0]


def test_global_batch_window_weighs_the_whole_step(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    out, train = _train(corpus, tmp_path / "global", "--reweight-window", "global-batch")
    _, one_microbatch = _train(corpus, tmp_path / "one", "--reweight-window", "micro-batch", "--micro-batch-size", "8")
    _, four_windows = _train(corpus, tmp_path / "four", "--reweight-window", "micro-batch")

    assert "4 micro-batches" in out and "global-batch window (b=8)" in out and "window global-batch b=8" in out
    assert train[ITERS]["weighting window b/global-batch"] == 8
    assert four_windows[ITERS]["weighting window b/micro-batch"] == 2
    for i in range(1, ITERS + 1):
        assert train[i]["window loss drift"] == 0  # pass 2 recomputed pass 1's losses exactly
        for key in ("lm loss", "weighted loss", "max weight x batch", "min weight x batch", "grad norm"):
            assert train[i][key] == pytest.approx(one_microbatch[i][key], rel=2e-4), (i, key)
    # The first steps after the r warm-up: windows of 2 samples weigh the same samples otherwise,
    # and the gradient differs with them.
    for i in (3, 4):
        for key in ("max weight x batch", "effective sample fraction", "grad norm"):
            assert four_windows[i][key] != pytest.approx(train[i][key], rel=0.05), (i, key, four_windows[i][key])
