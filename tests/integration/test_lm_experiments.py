"""Smoke run of benchmarks/tiny_lm_domains.py's noise experiment (4 steps, 2 runs, ~30 s).

Checks what the experiments' readings rest on, against expectations that do not come from
the script: the noise domain is what it claims (random tokens, the clean documents'
lengths, one end-of-document token each, a fifth of the documents), the repeated domain
is a few documents many times, the recorded weights are a distribution over every step's
batch (so their per-domain means average to 1), and a rerun reuses finished runs.
"""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from benchmarks import tiny_lm_domains as lm
from megatron_reweight.data.demo import ensure_demo_data

REPO = Path(__file__).resolve().parents[2]
SMOKE = [
    "--experiment", "noise", "--jobs", "2", "--strategies", "uniform", "linupper", "--seeds", "1",
    "--train-iters", "4", "--lr-warmup-iters", "1", "--reweight-r-warmup-steps", "2", "--eval-interval", "2",
    "--eval-iters", "1", "--log-interval", "1", "--weight-window", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "benchmarks.tiny_lm_domains", *SMOKE, "--out-dir", str(out), "--work-dir", str(out / "work")]
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    return out


def test_noise_domain_is_random_tokens_with_clean_lengths(smoke):
    demo = ensure_demo_data(REPO / "data" / "demo")
    clean = [d for prefix in demo.data_path[1::2] for d in lm._documents(prefix)]
    (prefix,) = (smoke / "work" / "noise").glob("*/noise.idx")  # one folder per demo tokenizer
    noise = lm._documents(str(prefix.with_suffix("")))
    assert len(noise) == round(len(clean) * lm.NOISE_SHARE / (1 - lm.NOISE_SHARE))
    assert {len(d) for d in noise} <= {len(d) for d in clean}
    for document in noise:
        assert document[-1] == demo.eod_id and demo.eod_id not in document[:-1]
    tokens = np.concatenate([d[:-1] for d in noise])
    # Uniform over the vocabulary but end-of-document: every id about equally often.
    counts = np.bincount(tokens, minlength=demo.vocab_size)
    assert counts[demo.eod_id] == 0
    assert np.delete(counts, demo.eod_id).std() < 4 * np.sqrt(tokens.size / (demo.vocab_size - 1))


def test_repeated_domain_is_a_few_documents_many_times(tmp_path):
    demo = ensure_demo_data(REPO / "data" / "demo")
    prefixes = demo.data_path[1::2]
    lm.write_repeated_domain(prefixes, tmp_path / "repeated", demo.vocab_size, demo.eod_id)
    documents = lm._documents(str(tmp_path / "repeated"))
    assert len(documents) == lm.REPEATED_DOCUMENTS * lm.REPEATS
    assert len({d.tobytes() for d in documents}) == lm.REPEATED_DOCUMENTS
    assert documents[0].tobytes() == lm._documents(prefixes[0])[0].tobytes()


def test_weights_are_a_distribution_over_each_batch(smoke):
    run = json.loads((smoke / "tiny_lm_noise" / "linupper-seed1.json").read_text())
    windows = run["per_domain_windows"]
    weights = np.array([[0.0 if w is None else w for w in row] for row in windows["weight_x_b"]])
    samples = np.array(windows["samples"])
    assert samples.sum() == 4 * 32 and samples[:, run["domains"].index("noise")].sum() > 0
    # sum_i w_i = 1 per step, so the sample-weighted mean of weight x b is exactly 1.
    assert (weights * samples).sum() / samples.sum() == pytest.approx(1.0, abs=1e-6)
    report = json.loads((smoke / "tiny_lm_noise.json").read_text())
    assert report["clean_domains"] == [d for d in run["domains"] if d != "noise"]
    assert set(report["paired_change_percent"]) == {"linupper"}


def test_rerun_reuses_finished_runs_of_the_same_configuration(smoke):
    args = lm.build_parser().parse_args(SMOKE)
    cfg = lm.config_from_args(args)
    run_dir = smoke / "tiny_lm_noise"
    before = {p: p.stat().st_mtime_ns for p in run_dir.glob("*.json")}
    lm.sweep(cfg, run_dir, work_dir=smoke / "missing", jobs=2)  # nothing left to launch, no data made
    assert {p: p.stat().st_mtime_ns for p in run_dir.glob("*.json")} == before
    assert not (smoke / "missing").exists()
    assert lm.completed(run_dir / "uniform-seed1.json", replace(cfg, train_iters=5)) is None
