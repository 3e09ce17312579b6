"""Megatron-LM's loss checks, kept with reweighting on.

pretrain_gpt.py's `loss_func` passes each microbatch's unweighted token-loss sum through
megatron-core's rerun state machine: NaN and Inf stop the run (`--check-for-nan-in-loss-and-grad`,
on by default), a loss 10x the largest seen is flagged (`--check-for-spiky-loss`), and the
same call serves `--rerun-mode` and `--error-injection-rate`. `LossChecks.validate` makes
exactly those calls, so a reweighted run keeps them on the loss Megatron would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SPIKY_LOSS_FACTOR = 10  # pretrain_gpt.py's: a loss 10x the largest observed is spiky


@dataclass(frozen=True)
class LossChecks:
    nan_and_inf: bool = True  # --check-for-nan-in-loss-and-grad
    spiky: bool = False  # --check-for-spiky-loss
    # What the non-fatal (spiky) check flagged since the caller last cleared it: a trainer saves
    # no checkpoint of a flagged step.
    flagged: list[str] = field(default_factory=list, compare=False)

    @classmethod
    def from_args(cls, args) -> LossChecks:
        return cls(nan_and_inf=args.check_for_nan_in_loss_and_grad, spiky=args.check_for_spiky_loss)

    def validate(self, loss: torch.Tensor) -> None:
        """pretrain_gpt.py's checks on one microbatch's local unweighted loss sum."""
        from megatron.core.rerun_state_machine import get_rerun_state_machine

        rerun_state_machine = get_rerun_state_machine()
        if self.nan_and_inf:
            for rejection_func, name in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
                rerun_state_machine.validate_result(
                    result=loss,
                    rejection_func=rejection_func,
                    message=f"found {name} in local forward loss calculation",
                    tolerance=0.0,  # forward pass calculations are deterministic
                    fatal=True,
                )
        if self.spiky:

            def spiky(result: torch.Tensor) -> bool:
                large = rerun_state_machine.is_unexpectedly_large(result, threshold=SPIKY_LOSS_FACTOR, context="loss")
                if large:
                    self.flagged.append(f"spiky loss {float(result):.4g}")
                return large

            rerun_state_machine.validate_result(
                result=loss,
                rejection_func=spiky,
                message="Spiky loss",
                tolerance=0.0,
                fatal=False,
            )
