"""Smoke test of benchmarks/toy_regression.py at reduced size (a few seconds).

Each check compares against an expectation derived independently of the
reweighting code: the closed-form least-squares fit, the SGD stability limit of a
single outlier, and paper 1's claim (Appendix B.2) that LinUpper converges faster.
"""

import importlib.util
import math
import sys
from dataclasses import replace

import pytest

from tests.helpers import REPO

BENCHMARK = REPO / "benchmarks" / "toy_regression.py"


@pytest.fixture(scope="module")
def toy():
    spec = importlib.util.spec_from_file_location("toy_regression", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cfg(toy):
    # Full-size data (cheap to make), few steps: the runs stop in the transient phase,
    # where the strategies differ; at the plateau they all sit at the outliers' bias.
    return replace(toy.ToyConfig(), steps=150, eval_every=50, seeds=(0, 1, 2))


def test_linupper_converges_faster_than_uniform(toy, cfg):
    for seed in cfg.seeds:
        problem = toy.make_problem(cfg, seed)
        uniform = toy.train(cfg, problem, "uniform", cfg.learning_rate, seed)
        linupper = toy.train(cfg, problem, "linupper", cfg.learning_rate, seed)
        assert linupper.test_loss[-1] < 0.8 * uniform.test_loss[-1], f"seed {seed}"


@pytest.mark.parametrize("strategy", ["uniform", "linupper", "quadratic", "extremes", "capped"])
def test_weights_are_a_distribution(toy, cfg, strategy):
    problem = toy.make_problem(cfg, 0)
    run = toy.train(cfg, problem, strategy, cfg.learning_rate, 0)
    assert run.weight_sum_error < 1e-9
    assert run.min_weight >= 0.0
    assert run.diverged_at is None


def test_uniform_sgd_reaches_the_least_squares_fit(toy, cfg):
    """Uniform SGD with a constant rate ends near the exact least-squares solution on
    all training points (outliers included), up to SGD noise."""
    long = replace(cfg, steps=1000, eval_every=1000)
    problem = toy.make_problem(long, 0)
    run = toy.train(long, problem, "uniform", long.learning_rate, 0)
    reference = toy.least_squares_test_loss(problem, clean_only=False)
    assert run.test_loss[-1] == pytest.approx(reference, rel=0.3)
    # The clean-only fit reaches the noise floor c^2 / 2; the outliers pull the full fit far above it.
    clean = toy.least_squares_test_loss(problem, clean_only=True)
    assert clean == pytest.approx(long.noise**2 / 2, rel=0.2)
    assert reference > 10 * clean


def test_kl_dro_diverges_above_the_single_outlier_stability_limit(toy, cfg):
    """softmax(l / r) with r = 1 is nearly one-hot here; one outlier has curvature
    |x|^2 + 1 ~ 4 p + 1, so SGD on it is stable only below 2 / (4 p + 1)."""
    limit = 2.0 / (cfg.outlier_offset**2 * cfg.features + 1)
    assert cfg.learning_rate > limit > cfg.dro_learning_rates[0]
    problem = toy.make_problem(cfg, 0)
    assert toy.train(cfg, problem, "irdro", cfg.learning_rate, 0).diverged_at is not None
    stable = toy.train(cfg, problem, "irdro", cfg.dro_learning_rates[0], 0)
    assert stable.diverged_at is None and math.isfinite(stable.test_loss[-1])
    assert stable.test_loss[-1] < stable.test_loss[0]
