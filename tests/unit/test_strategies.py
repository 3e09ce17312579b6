"""compute_weights against the papers' formulas, written out here independently in numpy."""

import math

import numpy as np
import pytest
import torch

from megatron_reweight import available_strategies, compute_weights, register_strategy

RNG = np.random.default_rng(0)
LOSSES = RNG.uniform(1.0, 6.0, size=32)


def paper1_reference(losses: np.ndarray, strategy: str, r: float, delta: float) -> np.ndarray:
    """Algorithm 1: normalise into [-delta, delta], apply the strategy, softmax with temperature r (Eq. 4)."""
    h = delta * (2 * (losses - losses.min()) / (losses.max() - losses.min()) - 1)
    s = {
        "uniform": np.zeros_like(h),
        "linupper": np.minimum(h + delta, delta),
        "quadratic": delta * (1 - h**2 / delta**2),
        "extremes": np.abs(h),
    }[strategy]
    e = np.exp((s - s.max()) / r)
    return e / e.sum()


@pytest.mark.parametrize("strategy", ["uniform", "linupper", "quadratic", "extremes"])
@pytest.mark.parametrize("r, delta", [(1.0, 1.0), (0.4, 1.0), (2.0, 0.5)])
def test_paper1_strategies_follow_algorithm_1(strategy, r, delta):
    weights = compute_weights(torch.tensor(LOSSES), strategy, r=r, delta=delta)
    np.testing.assert_allclose(weights.numpy(), paper1_reference(LOSSES, strategy, r, delta), rtol=1e-10)


def test_strategy_shapes_match_their_intent():
    order = np.argsort(LOSSES)
    lowest, middle, highest = order[0], order[len(order) // 2], order[-1]
    linupper = compute_weights(torch.tensor(LOSSES), "linupper", r=0.5).numpy()
    quadratic = compute_weights(torch.tensor(LOSSES), "quadratic", r=0.5).numpy()
    extremes = compute_weights(torch.tensor(LOSSES), "extremes", r=0.5).numpy()
    assert linupper[lowest] == linupper.min()  # low-loss samples are down-weighted
    assert quadratic[middle] > quadratic[lowest] and quadratic[middle] > quadratic[highest]
    assert extremes[lowest] == pytest.approx(extremes.max()) and extremes[highest] == pytest.approx(extremes.max())


@pytest.mark.parametrize("strategy", ["linupper", "quadratic", "extremes", "irdro", "capped"])
def test_large_temperature_gives_uniform_weights(strategy):
    weights = compute_weights(torch.tensor(LOSSES), strategy, r=1e9)
    np.testing.assert_allclose(weights.numpy(), np.full(len(LOSSES), 1 / len(LOSSES)), rtol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("strategy", sorted(set(available_strategies())))
def test_weights_are_a_distribution_of_same_shape_and_dtype(strategy, dtype):
    losses = torch.tensor(LOSSES, dtype=dtype)
    weights = compute_weights(losses, strategy, r=0.7)
    assert weights.shape == losses.shape and weights.dtype == dtype
    assert (weights >= 0).all()
    assert float(weights.double().sum()) == pytest.approx(1.0, abs=1e-2 if dtype == torch.bfloat16 else 1e-6)
    assert not weights.requires_grad


TINY_TEMPERATURES = [1e-2, 1e-5, 1e-30, 1e-300, 1e-310, 1e-320, 5e-324]  # down to the smallest float64
DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.float16]
SUM_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def tiny_temperature_reference(losses: np.ndarray, strategy: str, r: float) -> np.ndarray:
    """The weights in float64 log-space, written out from the formulas: exp(s_i/r - logsumexp(s/r))
    with logsumexp taken around the largest s/r, which -inf differences (s_i < s_max, r -> 0) leave
    exact. For `capped` the analytic limit (r <= 1e-30 here): the cap 2/b on the highest losses,
    the rest of the mass on the next."""
    if strategy == "capped":
        bound, weights, mass = 2 / len(losses), np.zeros(len(losses)), 1.0
        for i in np.argsort(-losses, kind="stable"):
            weights[i] = min(bound, mass)
            mass -= weights[i]
        return weights
    scores = losses if strategy == "irdro" else None
    if scores is None:
        h = 2 * (losses - losses.min()) / (losses.max() - losses.min()) - 1
        scores = {"linupper": np.minimum(h + 1, 1), "quadratic": 1 - h**2, "extremes": np.abs(h)}[strategy]
    with np.errstate(over="ignore", divide="ignore"):
        exponents = np.where(scores == scores.max(), 0.0, (scores - scores.max()) / r)
    return np.exp(exponents) / np.exp(exponents).sum()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strategy", ["linupper", "quadratic", "extremes", "irdro", "capped"])
def test_tiny_temperature_gives_finite_weights_on_the_extreme_samples(strategy, dtype):
    """Issue: scores / r overflowed to inf for r ~ 1e-310, so the softmax gave NaN and the weights
    were all 0 (or NaN for capped): no gradient at all."""
    # Distinct losses (in every dtype), so the samples of the largest score are unambiguous
    # whatever the rounding of the normalisation.
    losses = torch.tensor([2.1, 3.5, 2.9, 7.8, 1.25, 5.0, 4.25, 6.5], dtype=dtype)
    exact = losses.double().numpy()
    for r in TINY_TEMPERATURES:
        weights = compute_weights(losses, strategy, r=r)
        assert weights.dtype == dtype and torch.isfinite(weights).all() and (weights >= 0).all(), (r, weights)
        assert abs(float(weights.double().sum()) - 1.0) <= SUM_TOLERANCE[dtype], (r, weights)
        if strategy == "capped" and r > 1e-30:
            continue  # its reference is the limit; the Proposition 1 test covers larger r
        expected = tiny_temperature_reference(exact, strategy, r)
        atol = 1e-300 if dtype == torch.float64 else SUM_TOLERANCE[dtype]
        np.testing.assert_allclose(weights.double().numpy(), expected, rtol=SUM_TOLERANCE[dtype], atol=atol)


@pytest.mark.parametrize("strategy", sorted(set(available_strategies()) - {"test-top1"}))
def test_tiny_temperature_limit_splits_ties_and_keeps_every_strategy_a_distribution(strategy):
    """At r -> 0 the weight goes to the samples of the largest score, equally when they tie."""
    losses = torch.tensor([3.0, 9.0, 1.0, 9.0, 5.0, 1.0, 7.0, 4.0], dtype=torch.float64)
    for r in (1e-320, 5e-324):
        weights = compute_weights(losses, strategy, r=r)
        assert torch.isfinite(weights).all() and abs(float(weights.sum()) - 1.0) < 1e-12, (strategy, r, weights)
    expected = {
        "linupper": [0, 0.25, 0, 0.25, 0.25, 0, 0.25, 0],  # its score is flat from the midpoint 5 up
        "irdro": [0, 0.5, 0, 0.5, 0, 0, 0, 0],  # the two highest losses
        "extremes": [0, 0.25, 0.25, 0.25, 0, 0.25, 0, 0],  # highest and lowest
        "quadratic": [0, 0, 0, 0, 1, 0, 0, 0],  # loss 5 is the midpoint of [1, 9]
        "capped": [0, 0.25, 0, 0.25, 0.25, 0, 0.25, 0],  # the cap 2/b = 0.25 on 9, 9, 7, then 5
        "uniform": [1 / 8] * 8,
    }.get(strategy)  # the ranking strategies ignore r: a distribution is all they must give
    if expected is not None:
        np.testing.assert_allclose(compute_weights(losses, strategy, r=1e-320).numpy(), expected, atol=1e-300)


def test_linupper_respects_theorem_1_bound_for_paper_temperatures():
    # Section A.5: with r >= 1 LinUpper keeps max w_i <= 2/b (softmax of scores in [0, delta]).
    for r in (1.0, 2.0):
        weights = compute_weights(torch.tensor(LOSSES), "linupper", r=r)
        assert float(weights.max()) * len(LOSSES) <= 2.0


def test_irdro_is_softmax_of_raw_losses():
    r = 1.5
    expected = np.exp(LOSSES / r) / np.exp(LOSSES / r).sum()
    np.testing.assert_allclose(compute_weights(torch.tensor(LOSSES), "irdro", r=r).numpy(), expected, rtol=1e-10)


@pytest.mark.parametrize("r", [0.05, 0.3, 1.0])
def test_capped_is_the_proposition_1_optimum(r):
    """Proposition 1: the minimiser of -sum w_i h_i + r sum w_i log(b w_i) with w_i <= 2/b, sum w = 1,
    is w_i = min(C exp(h_i / r), 2/b). Check the KKT form and optimality against feasible perturbations."""
    b = len(LOSSES)
    h = 2 * (LOSSES - LOSSES.min()) / (LOSSES.max() - LOSSES.min()) - 1
    w = compute_weights(torch.tensor(LOSSES), "capped", r=r).numpy()
    cap = 2.0 / b
    assert w.sum() == pytest.approx(1.0) and w.max() <= cap * (1 + 1e-9)
    free = w < cap * (1 - 1e-9)
    constant = w[free] / np.exp(h[free] / r)
    np.testing.assert_allclose(constant, constant[0], rtol=1e-8)  # one C for every uncapped sample
    assert (constant[0] * np.exp(h[~free] / r) >= cap * (1 - 1e-9)).all()  # capped ones would exceed the cap

    def objective(v):
        return -(v * h).sum() + r * (v * np.log(b * v)).sum()

    for _ in range(200):
        direction = RNG.normal(size=b)
        direction -= direction.mean()
        candidate = w + 1e-3 * direction / np.abs(direction).max() / b
        if candidate.min() > 0 and candidate.max() <= cap:
            assert objective(candidate) >= objective(w) - 1e-12


def test_capped_with_small_r_binds_the_cap():
    weights = compute_weights(torch.tensor(LOSSES), "capped", r=0.05)
    assert float(weights.max()) == pytest.approx(2 / len(LOSSES))


def test_capped_weights_of_float64_losses_sum_to_one_in_float64():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0], dtype=torch.float64)
    weights = compute_weights(losses, "capped", r=0.1, cap=1.0)  # every sample capped at 1/b
    assert weights.dtype == torch.float64
    assert abs(float(weights.sum()) - 1.0) < 1e-14
    torch.testing.assert_close(weights, torch.full_like(weights, 0.2), rtol=1e-14, atol=0)


@pytest.mark.parametrize(
    "strategy, options, kept_ranks",
    [
        ("midranking", {}, range(2, 4)),  # b=8, n1=n2=0.25: skip top 2, keep the next 2
        ("midranking", {"skip_fraction": 0.5, "keep_fraction": 0.5}, range(4, 8)),
        ("highranking", {}, range(2)),
        ("lowranking", {}, range(6, 8)),
        ("midranking", {"skip_fraction": 0.0, "keep_fraction": 1.0}, range(8)),  # = uniform
    ],
)
def test_ranking_strategies_keep_exact_bands(strategy, options, kept_ranks):
    losses = torch.tensor([3.0, 9.0, 1.0, 7.0, 5.0, 2.0, 8.0, 4.0])
    by_rank = torch.argsort(losses, descending=True)  # rank 0 = highest loss
    weights = compute_weights(losses, strategy, **options)
    expected = torch.zeros(8)
    expected[by_rank[list(kept_ranks)]] = 1.0 / len(kept_ranks)
    torch.testing.assert_close(weights, expected)


def test_ranking_counts_floor_and_keep_at_least_one():
    losses = torch.arange(10, dtype=torch.float64)  # b=10: floor(2.5) = 2 skipped, 2 kept
    weights = compute_weights(losses, "midranking")
    assert weights.nonzero().flatten().tolist() == [6, 7]
    single = compute_weights(torch.tensor([1.0, 2.0, 3.0]), "highranking", keep_fraction=0.1)
    assert single.tolist() == [0.0, 0.0, 1.0]


def test_equal_losses_give_uniform_weights():
    for strategy in ("linupper", "quadratic", "extremes", "capped", "irdro"):
        weights = compute_weights(torch.full((6,), 2.5), strategy, r=0.1)
        torch.testing.assert_close(weights, torch.full((6,), 1 / 6))


@pytest.mark.parametrize("strategy", ["uniform", "linupper", "quadratic", "extremes", "irdro", "capped", "midranking"])
def test_nonfinite_losses_get_zero_weight_and_the_rest_renormalise(strategy):
    finite_at = RNG.permutation(32)[:20]
    losses = np.full(32, math.nan)
    losses[finite_at] = LOSSES[:20]
    losses[RNG.permutation(32)[:4]] = math.nan  # may hit finite places too: re-read below
    losses[[i for i in range(32) if not np.isfinite(losses[i])][:3]] = [math.inf, -math.inf, math.inf]
    finite = np.isfinite(losses)
    weights = compute_weights(torch.tensor(losses), strategy, r=0.5).numpy()
    np.testing.assert_allclose(
        weights[finite], compute_weights(torch.tensor(losses[finite]), strategy, r=0.5).numpy(), rtol=1e-12
    )
    if strategy in ("uniform", "linupper", "quadratic", "extremes"):
        np.testing.assert_allclose(weights[finite], paper1_reference(losses[finite], strategy, 0.5, 1.0), rtol=1e-10)
    if strategy == "irdro":
        e = np.exp((losses[finite] - losses[finite].max()) / 0.5)
        np.testing.assert_allclose(weights[finite], e / e.sum(), rtol=1e-10)
    assert (weights[~finite] == 0).all()
    assert compute_weights(torch.tensor([math.nan, math.inf]), strategy).tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: compute_weights(torch.ones(4), "linupper", r=0.0), "r must be a finite number > 0"),
        (lambda: compute_weights(torch.ones(4), "linupper", r=-1.0), "r must be a finite number > 0"),
        (lambda: compute_weights(torch.ones(4), "linupper", delta=0.0), "delta must be a finite number > 0"),
        (lambda: compute_weights(torch.ones(4), "nope"), "unknown reweighting strategy 'nope'"),
        (lambda: compute_weights(torch.ones(4), "midranking", skip_fraction=0.6, keep_fraction=0.5), r"n1 \+ n2"),
        (lambda: compute_weights(torch.ones(4), "linupper", keep_fraction=0.5), "does not take options"),
        (lambda: compute_weights(torch.ones(2, 2), "linupper"), "1-D tensor"),
        (lambda: compute_weights(torch.ones(4, dtype=torch.long), "linupper"), "floating point"),
        (lambda: compute_weights(torch.ones(4), "capped", cap=0.5), "finite cap >= 1"),
        (lambda: compute_weights(torch.ones(4), "capped", cap=float("inf")), "finite cap >= 1"),
    ],
)
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_users_can_register_a_strategy():
    @register_strategy("test-top1")
    def top1(losses, *, r, delta):
        weights = torch.zeros_like(losses)
        weights[losses.argmax()] = 1.0
        return weights

    assert "test-top1" in available_strategies()
    assert compute_weights(torch.tensor([1.0, 5.0, 2.0, math.nan]), "test-top1").tolist() == [0, 1, 0, 0]
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("test-top1")(top1)
