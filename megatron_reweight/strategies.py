"""Loss-based sample weights: the papers' strategies behind one pure function.

`compute_weights(losses, strategy, r, delta, **kwargs)` maps the per-sample losses
of a whole (gathered) batch to non-negative weights that sum to 1.

Paper 1 (dynamic loss-based reweighting, Algorithm 1):
    h_i = delta * (2 (f_i - f_min) / (f_max - f_min) - 1)      in [-delta, delta]
    s_i = strategy(h_i)                                          LinUpper / Quadratic / Extremes
    w_i = exp(s_i / r) / sum_j exp(s_j / r)                      Eq. (4)
`capped` is Proposition 1: w_i = min(C exp(h_i / r), cap / b), C normalising.
Paper 2 (IR-DRO): `irdro` is Eq. (3), softmax(f_i / r) on raw losses, and
`midranking` / `highranking` / `lowranking` keep a band of samples ranked by loss.

A sample whose loss is not finite (NaN, +-Inf) gets weight 0 and the others are
weighted among themselves; if no loss is finite every weight is 0.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Protocol

import torch

__all__ = [
    "available_strategies",
    "compute_weights",
    "normalize_losses",
    "register_score_strategy",
    "register_strategy",
]


class WeightStrategy(Protocol):
    """Maps finite losses (1-D float tensor, at least one entry) to weights summing to 1."""

    def __call__(self, losses: torch.Tensor, *, r: float, delta: float, **kwargs) -> torch.Tensor: ...


_STRATEGIES: dict[str, WeightStrategy] = {}


def register_strategy(name: str) -> Callable[[WeightStrategy], WeightStrategy]:
    """Decorator adding a strategy under `name`, usable from outside the package.

    The function receives only the finite losses and returns their weights (sum 1)."""

    def decorator(fn: WeightStrategy) -> WeightStrategy:
        key = name.lower()
        if key in _STRATEGIES:
            raise ValueError(f"reweighting strategy {name!r} is already registered; pick another name")
        _STRATEGIES[key] = fn
        return fn

    return decorator


def _tempered_softmax(scores: torch.Tensor, r: float, among: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(scores / r) over the entries `among` selects (default all), 0 elsewhere.

    Shifted by the largest score before dividing by r (softmax is shift-invariant), so no
    temperature overflows: every exponent is <= 0 and the largest ones are exactly 0. As
    r -> 0 this is the analytic limit, equal weights on the samples of the largest score."""
    if among is None:
        among = torch.ones_like(scores, dtype=torch.bool)
    shifted = (scores - torch.where(among, scores, -torch.inf).max()) / r
    weights = torch.softmax(torch.where(among, shifted, -torch.inf), dim=0)
    return torch.nan_to_num(weights, nan=0.0)  # nothing selected: all -inf, NaN


class _SoftmaxStrategy:
    """Weights = softmax(score_i / r) over the finite losses.

    `scores(losses, finite, delta)` may return anything where `finite` is False. Masking
    the other losses, rather than selecting the finite ones, keeps the weights free of
    host-device syncs on a GPU (selection waits for the GPU on every microbatch)."""

    def __init__(self, scores: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]):
        self.scores = scores

    def masked(self, losses: torch.Tensor, finite: torch.Tensor, r: float, delta: float) -> torch.Tensor:
        return _tempered_softmax(self.scores(torch.where(finite, losses, 0.0), finite, delta), r, finite)

    def __call__(self, losses: torch.Tensor, *, r: float, delta: float) -> torch.Tensor:
        return self.masked(losses, torch.ones_like(losses, dtype=torch.bool), r, delta)


def register_score_strategy(name: str) -> Callable[[Callable[[torch.Tensor, float], torch.Tensor]], Callable]:
    """Decorator for paper-1 style strategies: `score(h, delta) -> s` on normalised losses,
    followed by the temperature softmax of Eq. (4)."""

    def decorator(score: Callable[[torch.Tensor, float], torch.Tensor]):
        register_strategy(name)(
            _SoftmaxStrategy(lambda losses, finite, delta: score(normalize_losses(losses, delta, finite), delta))
        )
        return score

    return decorator


@functools.cache
def _signature(fn: WeightStrategy) -> inspect.Signature:
    return inspect.signature(fn)  # cached: compute_weights runs every microbatch


def available_strategies() -> list[str]:
    return sorted(_STRATEGIES)


def normalize_losses(losses: torch.Tensor, delta: float = 1.0, among: torch.Tensor | None = None) -> torch.Tensor:
    """Linear map of the batch's losses onto [-delta, delta] (Algorithm 1, line 5), by the
    min and max of the entries `among` selects (default all).

    A batch whose losses are all equal maps to 0, i.e. uniform weights."""
    if among is None:
        low, high = losses.min(), losses.max()
    else:
        low, high = torch.where(among, losses, torch.inf).min(), torch.where(among, losses, -torch.inf).max()
    # Halved, so differences of losses near the dtype's maximum cannot overflow (exact: powers of 2).
    half_spread = high / 2 - low / 2
    # Branch-free (no host sync on GPU): a spread within rounding of zero maps to 0.
    flat = half_spread <= torch.finfo(losses.dtype).eps / 2 * high.abs().clamp(min=1.0)
    position = (losses / 2 - low / 2) / torch.where(flat, 1.0, half_spread)  # in [0, 1]
    return torch.where(flat, torch.zeros_like(losses), delta * (2.0 * position - 1.0))


def compute_weights(
    losses: torch.Tensor,
    strategy: str,
    r: float = 1.0,
    delta: float = 1.0,
    **strategy_kwargs,
) -> torch.Tensor:
    """Weights for a batch of per-sample losses (1-D): non-negative, summing to 1.

    `r` is the softmax temperature (large r -> uniform), `delta` the half-width of
    the normalisation interval. Weights carry no gradient."""
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
        raise ValueError(
            f"losses must be a 1-D tensor of per-sample losses, got "
            f"{type(losses).__name__}{tuple(losses.shape) if isinstance(losses, torch.Tensor) else ''}; "
            "flatten the gathered batch first"
        )
    if not losses.is_floating_point():
        raise ValueError(f"losses must be floating point, got {losses.dtype}")
    if not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0):
        raise ValueError(f"temperature r must be a finite number > 0, got {r!r}")
    if not (isinstance(delta, (int, float)) and math.isfinite(delta) and delta > 0):
        raise ValueError(f"delta must be a finite number > 0, got {delta!r}")
    key = strategy.lower() if isinstance(strategy, str) else strategy
    if key not in _STRATEGIES:
        raise ValueError(
            f"unknown reweighting strategy {strategy!r}; choose one of {available_strategies()} "
            "or add your own with megatron_reweight.register_strategy"
        )

    strategy_fn = _STRATEGIES[key]
    try:
        _signature(strategy_fn).bind(losses, r=r, delta=delta, **strategy_kwargs)
    except TypeError as error:
        raise ValueError(f"strategy {strategy!r} does not take options {sorted(strategy_kwargs)}: {error}") from None

    if losses.numel() == 0:  # whatever the strategy: an empty batch gets empty weights
        return torch.empty_like(losses).detach()
    with torch.no_grad():
        # float64 keeps the softmax exact enough for tiny temperatures and large batches.
        work = losses.detach().to(torch.float64)
        finite = torch.isfinite(work)
        if isinstance(strategy_fn, _SoftmaxStrategy):
            return strategy_fn.masked(work, finite, float(r), float(delta)).to(losses.dtype)
        weights = torch.zeros_like(work)
        if finite.any():
            weights[finite] = strategy_fn(work[finite], r=float(r), delta=float(delta), **strategy_kwargs)
        return weights.to(losses.dtype)


# --- Paper 1: strategies on normalised losses, then Eq. (4) -------------------------------


@register_score_strategy("uniform")
def _uniform(h: torch.Tensor, delta: float) -> torch.Tensor:
    return torch.zeros_like(h)


@register_score_strategy("linupper")
def _linupper(h: torch.Tensor, delta: float) -> torch.Tensor:
    return torch.clamp(h + delta, max=delta)


@register_score_strategy("quadratic")
def _quadratic(h: torch.Tensor, delta: float) -> torch.Tensor:
    return delta * (1.0 - h**2 / delta**2)


@register_score_strategy("extremes")
def _extremes(h: torch.Tensor, delta: float) -> torch.Tensor:
    return h.abs()


@register_strategy("capped")
def _capped(losses: torch.Tensor, *, r: float, delta: float, cap: float = 2.0) -> torch.Tensor:
    """Proposition 1: w_i = min(C exp(h_i / r), cap / b), the KKT solution of the
    KL-regularised objective under the Theorem 1 bound (cap = 2)."""
    count = losses.numel()
    if not 1.0 <= cap < math.inf:
        raise ValueError(
            f"capped strategy needs a finite cap >= 1 (weights must be able to sum to 1; "
            f"for no cap use strategy 'linupper'), got {cap}"
        )
    bound = cap / count
    h = normalize_losses(losses, delta)
    capped = torch.zeros_like(h, dtype=torch.bool)
    # Water-filling: each pass caps the samples over the bound and spreads the remaining
    # mass over the rest in proportion to exp(h/r); at most `count` passes.
    while True:
        free_mass = 1.0 - bound * capped.sum(dtype=h.dtype)
        weights = torch.full_like(h, bound)
        weights[~capped] = free_mass * _tempered_softmax(h[~capped], r)
        over = (weights > bound * (1 + 1e-12)) & ~capped
        if not over.any():
            return weights
        capped |= over


# --- Paper 2: IR-DRO and loss-rank selection --------------------------------------------


# Eq. (3): softmax(f_i / r) on the raw losses.
register_strategy("irdro")(_SoftmaxStrategy(lambda losses, finite, delta: losses))


def _fraction_count(fraction: float, count: int, name: str) -> int:
    """Number of samples a fraction of the batch covers: floor(fraction * b), at least 1."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {fraction}")
    return max(1, math.floor(fraction * count + 1e-9))


def _rank_band(losses: torch.Tensor, skip: int, keep: int) -> torch.Tensor:
    """Equal weights on `keep` samples ranked by descending loss, after the top `skip`."""
    # Stable sort so ties are broken by position, identically on every rank.
    order = torch.sort(losses, descending=True, stable=True).indices
    weights = torch.zeros_like(losses)
    weights[order[skip : skip + keep]] = 1.0 / keep
    return weights


@register_strategy("midranking")
def _midranking(
    losses: torch.Tensor, *, r: float, delta: float, skip_fraction: float = 0.25, keep_fraction: float = 0.25
) -> torch.Tensor:
    """Paper 2, section 3: skip the top n1 = skip_fraction of the batch by loss, keep the next n2."""
    if not 0.0 <= skip_fraction < 1.0:
        raise ValueError(f"skip_fraction (n1) must be in [0, 1), got {skip_fraction}")
    if skip_fraction + keep_fraction > 1.0 + 1e-12:
        raise ValueError(f"skip_fraction + keep_fraction (n1 + n2) must be <= 1, got {skip_fraction} + {keep_fraction}")
    count = losses.numel()
    keep = _fraction_count(keep_fraction, count, "keep_fraction (n2)")
    skip = min(math.floor(skip_fraction * count + 1e-9), count - keep)
    return _rank_band(losses, skip, keep)


@register_strategy("highranking")
def _highranking(losses: torch.Tensor, *, r: float, delta: float, keep_fraction: float = 0.25) -> torch.Tensor:
    """The keep_fraction of the batch with the highest losses (n1 = 0)."""
    return _rank_band(losses, 0, _fraction_count(keep_fraction, losses.numel(), "keep_fraction (n2)"))


@register_strategy("lowranking")
def _lowranking(losses: torch.Tensor, *, r: float, delta: float, keep_fraction: float = 0.25) -> torch.Tensor:
    """The keep_fraction of the batch with the lowest losses (n1 = 1 - n2)."""
    keep = _fraction_count(keep_fraction, losses.numel(), "keep_fraction (n2)")
    return _rank_band(losses, losses.numel() - keep, keep)
