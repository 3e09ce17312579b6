"""The temperature r of Eq. (4) over training.

Paper 1 holds r large (100) for the first warm-up steps, so weights stay near
uniform while losses are still uninformative, then drops to the preset's value
(Table 7: 0.4, 1.0, 2.0). `linear` and `cosine` instead move smoothly from the
warm-up value to the final one over `anneal_steps` after the warm-up.
The schedule is a pure function of the step, so a resumed run needs only its step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_reweight.settings import non_negative, setting

ANNEAL_STYLES = ("step", "linear", "cosine")


@dataclass(frozen=True)
class TemperatureSchedule:
    r: float = setting(1.0, "softmax temperature r after warm-up", flag="--reweight-r")
    warmup_steps: int = setting(
        0, "steps at --reweight-r-warmup-value first", flag="--reweight-r-warmup-steps", check=non_negative
    )
    warmup_r: float = setting(100.0, "r during warm-up", flag="--reweight-r-warmup-value")
    anneal: str = setting(
        "step", "after warm-up: jump to r (step, as in the paper) or move there linearly / by cosine",
        flag="--reweight-r-anneal", choices=ANNEAL_STYLES,
    )  # fmt: skip
    anneal_steps: int = setting(
        0, "length of a linear/cosine anneal", flag="--reweight-r-anneal-steps", check=non_negative
    )

    def __post_init__(self) -> None:
        for name in ("r", "warmup_r"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"temperature {name} must be a finite number > 0, got {value}")
        if self.warmup_steps < 0 or self.anneal_steps < 0:
            raise ValueError("warmup_steps and anneal_steps must be >= 0")
        if self.anneal not in ANNEAL_STYLES:
            raise ValueError(f"unknown temperature anneal {self.anneal!r}; choose one of {ANNEAL_STYLES}")
        if self.anneal != "step" and self.anneal_steps == 0:
            raise ValueError(f"anneal={self.anneal!r} needs anneal_steps > 0 (or use anneal='step')")

    def __call__(self, step: int) -> float:
        """Temperature at a 0-based training step."""
        if step < self.warmup_steps:
            return self.warmup_r
        if self.anneal == "step":
            return self.r
        progress = min(1.0, (step - self.warmup_steps) / self.anneal_steps)
        if self.anneal == "cosine":
            progress = 0.5 * (1.0 - math.cos(math.pi * progress))
        return self.warmup_r + (self.r - self.warmup_r) * progress
