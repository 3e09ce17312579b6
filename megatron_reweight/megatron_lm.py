"""Sample reweighting in Megatron-LM's own pretrain_gpt.py, unmodified.

Run your pretrain_gpt.py through this module, with your usual flags plus ours:

    torchrun --nproc-per-node 8 -m megatron_reweight.megatron_lm /path/to/Megatron-LM/pretrain_gpt.py \\
        <your Megatron-LM flags> --reweight-strategy linupper --reweight-r 2.0 --reweight-r-warmup-steps 2000

The script runs as `python pretrain_gpt.py` would (its folder on sys.path, `__main__`), with
`megatron.training.pretrain` wrapped so that:
* our flags are added to Megatron-LM's parser (after the script's own extra_args_provider);
* unsupported combinations stop the run before the model is built, naming the reason;
* in training, the loss function that the script's forward_step returns,
  `partial(loss_func, loss_mask, model=model)`, is replaced by ours with the same arguments;
  evaluation keeps the script's own loss function, so its output reads as Megatron's.
Our `loss_func` keeps pretrain_gpt.py's loss checks (--check-for-nan-in-loss-and-grad,
--check-for-spiky-loss, --rerun-mode, --error-injection-rate) on the unweighted loss.
"""

from __future__ import annotations

import functools
import inspect
import os
import runpy
import sys

import torch

from megatron_reweight.arguments import add_reweight_args, reweight_config_from_args
from megatron_reweight.loss import SampleReweighter, check_megatron_config
from megatron_reweight.loss_checks import LossChecks

__all__ = ["add_reweight_args", "check_megatron_args", "loss_func", "main", "with_reweighting"]

# (args, data-parallel group, context-parallel group, reweighter): rebuilt when Megatron-LM
# makes new args or process groups (in-process restart).
_cached: tuple | None = None


def check_megatron_args(args) -> None:
    """Refuse the Megatron-LM settings whose losses our scaling would get wrong."""
    check_megatron_config(args.calculate_per_token_loss, args.ddp_average_in_collective)
    if args.num_experts is not None and args.calculate_per_token_loss:
        raise ValueError(
            "--num-experts with --calculate-per-token-loss is not supported with reweighting: the MoE router "
            "multiplies its auxiliary losses by the local token count, expecting Megatron to divide by the "
            "global token count, but reweighting returns 1 token per microbatch; drop --calculate-per-token-loss"
        )
    if args.mtp_num_layers is not None:
        raise ValueError(
            "--mtp-num-layers is not supported with reweighting: the multi-token-prediction losses bypass the "
            "loss function, so their samples would stay unweighted; drop --mtp-num-layers or the reweighting"
        )
    if getattr(args, "modelopt_enabled", False):
        raise ValueError("ModelOpt distillation losses are not supported with reweighting; run without ModelOpt")
    if reweight_config_from_args(args).window != "micro-batch":  # a bad strategy or option fails here too
        raise ValueError(
            "--reweight-window global-batch is not available in Megatron-LM: its train_step runs the step's "
            "micro-batches once, and that window needs a forward-only pass over them first (pretrain_llama.py "
            "has it). Use --reweight-window micro-batch; with --micro-batch-size x data-parallel size = "
            "--global-batch-size one micro-batch is the whole global batch and the two windows are the same"
        )


def _reweighter(args) -> SampleReweighter:
    from megatron.core import parallel_state

    global _cached
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=False)
    cp_group = parallel_state.get_context_parallel_group()
    if _cached is None or _cached[0] is not args or _cached[1] is not dp_group or _cached[2] is not cp_group:
        reweighter = SampleReweighter(
            reweight_config_from_args(args), dp_group, cp_group, checks=LossChecks.from_args(args)
        )
        _cached = (args, dp_group, cp_group, reweighter)
    return _cached[3]


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, model=None):
    """pretrain_gpt.py's `loss_func`, reweighted: reads our flags and the iteration from Megatron-LM's args."""
    from megatron.training import get_args  # Megatron-LM, not in the megatron-core wheel

    args = get_args()
    reweighter = _reweighter(args)
    reweighter.step = args.curr_iteration
    return reweighter.loss_func(loss_mask, output_tensor)


def _reweighted_forward_step(forward_step):
    @functools.wraps(forward_step)
    def wrapped(*args, **kwargs):
        output, megatron_loss_func = forward_step(*args, **kwargs)
        if not torch.is_grad_enabled():  # Megatron-LM evaluates under no_grad: its own loss and report
            return output, megatron_loss_func
        if not isinstance(megatron_loss_func, functools.partial):
            raise TypeError(
                "forward_step must return partial(loss_func, loss_mask, ...) as pretrain_gpt.py does, "
                f"got {megatron_loss_func!r}"
            )
        return output, functools.partial(loss_func, *megatron_loss_func.args, **megatron_loss_func.keywords)

    return wrapped


def _checked_model_provider(model_provider):
    @functools.wraps(model_provider)
    def wrapped(*args, **kwargs):
        from megatron.training import get_args

        check_megatron_args(get_args())
        return model_provider(*args, **kwargs)

    return wrapped


def _with_reweight_args(extra_args_provider):
    def provider(parser):
        if extra_args_provider is not None:
            parser = extra_args_provider(parser)
        return add_reweight_args(parser)

    return provider


def with_reweighting(pretrain):
    """Megatron-LM's `pretrain`, with our flags, checks and training loss function."""
    signature = inspect.signature(pretrain)

    @functools.wraps(pretrain)
    def wrapped(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        call.arguments["model_provider"] = _checked_model_provider(call.arguments["model_provider"])
        call.arguments["forward_step_func"] = _reweighted_forward_step(call.arguments["forward_step_func"])
        call.arguments["extra_args_provider"] = _with_reweight_args(call.arguments.get("extra_args_provider"))
        return pretrain(*call.args, **call.kwargs)

    return wrapped


def main(argv: list[str] | None = None) -> None:
    """`python -m megatron_reweight.megatron_lm PRETRAIN_SCRIPT [flags...]`: run the script with reweighting."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not argv[0].endswith(".py"):
        sys.exit("usage: python -m megatron_reweight.megatron_lm PATH/pretrain_gpt.py [Megatron-LM, --reweight-* flags]")
    script = os.path.abspath(argv[0])
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(script))  # as `python pretrain_gpt.py` has it: megatron.training
    import megatron.training
    import megatron.training.training

    calls = []

    def pretrain(*args, **kwargs):
        calls.append(1)
        return reweighted(*args, **kwargs)

    reweighted = with_reweighting(megatron.training.training.pretrain)
    # Both import paths: pretrain_gpt.py imports it from megatron.training.
    megatron.training.pretrain = megatron.training.training.pretrain = pretrain
    runpy.run_path(script, run_name="__main__")
    if not calls:
        sys.exit(f"{script} never called megatron.training's pretrain: it trained without reweighting")


if __name__ == "__main__":
    main()
