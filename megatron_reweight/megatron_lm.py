"""Sample reweighting in Megatron-LM's own pretrain_gpt.py, unmodified.

Run your pretrain_gpt.py through this module, with your usual flags plus ours:

    torchrun --nproc-per-node 8 -m megatron_reweight.megatron_lm /path/to/Megatron-LM/pretrain_gpt.py \\
        <your Megatron-LM flags> --reweight-strategy linupper --reweight-r 2.0 --reweight-r-warmup-steps 2000

The script runs as `python pretrain_gpt.py` would (its folder on sys.path, `__main__`), with
`megatron.training.pretrain` wrapped so that:
* our flags are added to Megatron-LM's parser (after the script's own extra_args_provider);
* unsupported combinations stop the run before the model is built, naming the reason, in one
  line from the first rank (`Refused`);
* in training, the loss function that the script's forward_step returns,
  `partial(loss_func, loss_mask, model=model)`, is replaced by ours with the same arguments;
  evaluation keeps the script's own loss function, so its output reads as Megatron's;
* Megatron-LM's train_step runs its forward-backward through `megatron_reweight.window`: in the
  global-batch window a forward-only pass over the step's micro-batches comes first, and with
  --reweight-skip-nonfinite-samples a step with a non-finite sample makes no update (its
  optimizer step reads as fp16 loss scaling's skipped one).
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

from megatron_reweight import window
from megatron_reweight.arguments import add_reweight_args, reweight_config_from_args
from megatron_reweight.loss import SampleReweighter, check_megatron_config
from megatron_reweight.loss_checks import LossChecks

__all__ = ["add_reweight_args", "check_megatron_args", "loss_func", "main", "with_reweighting"]

# (args, data-parallel group, context-parallel group, reweighter, audit or None): rebuilt when
# Megatron-LM makes new args or process groups (in-process restart).
_cached: tuple | None = None
_train_dataset: list = [None]  # the training dataset Megatron-LM built: the audit's document ids


class Refused(ValueError):
    """A Megatron-LM setting the drop-in does not support: reported as one line, not a traceback."""


def check_megatron_args(args) -> None:
    """Refuse the Megatron-LM settings whose losses our scaling would get wrong."""
    try:
        check_megatron_config(args.calculate_per_token_loss, args.ddp_average_in_collective)
        config = reweight_config_from_args(args)  # a bad strategy or option fails here too
    except ValueError as error:
        raise Refused(str(error)) from None
    if args.num_experts is not None and args.calculate_per_token_loss:
        raise Refused(
            "--num-experts with --calculate-per-token-loss is not supported with reweighting: the MoE router "
            "multiplies its auxiliary losses by the local token count, expecting Megatron to divide by the "
            "global token count, but reweighting returns 1 token per microbatch; drop --calculate-per-token-loss"
        )
    if args.mtp_num_layers is not None:
        raise Refused(
            "--mtp-num-layers is not supported with reweighting: the multi-token-prediction losses bypass the "
            "loss function, so their samples would stay unweighted; drop --mtp-num-layers or the reweighting"
        )
    if getattr(args, "modelopt_enabled", False):
        raise Refused("ModelOpt distillation losses are not supported with reweighting; run without ModelOpt")
    if getattr(args, "hybrid_context_parallel", False):
        raise Refused(
            "--hybrid-context-parallel is not supported with reweighting: its context-parallel groups vary per "
            "sample, so a sample's loss cannot be summed and scaled over a fixed CP group; drop it"
        )
    if getattr(args, "sft", False):
        raise Refused(
            "--sft is not supported with reweighting: it packs several documents into one row (THD), so a "
            "'sample' would be a pack of documents, not one; drop --sft or the reweighting"
        )
    if config.window == "global-batch":
        fp8 = getattr(args, "fp8", None) is not None and getattr(args, "fp8_recipe", None) == "delayed"
        interleaved = getattr(args, "virtual_pipeline_model_parallel_size", None) is not None
        reason = window.refusal(
            cuda_graphs=getattr(args, "cuda_graph_impl", None),
            fp8_delayed_scaling=fp8,
            interleaved_param_gather=interleaved and getattr(args, "overlap_param_gather", False),
        )
        if reason is not None:
            raise Refused(f"--reweight-window global-batch is not supported with {reason}")


def _reweighter(args) -> SampleReweighter:
    from megatron.core import parallel_state

    global _cached
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=False)
    cp_group = parallel_state.get_context_parallel_group()
    if _cached is None or _cached[0] is not args or _cached[1] is not dp_group or _cached[2] is not cp_group:
        reweighter = SampleReweighter(
            reweight_config_from_args(args), dp_group, cp_group, checks=LossChecks.from_args(args)
        )
        audit = None
        if args.reweight_audit_dir is not None:
            from megatron_reweight.audit.megatron_lm import MegatronLMAudit

            audit = MegatronLMAudit(args, reweighter, _train_dataset[0])
        _cached = (args, dp_group, cp_group, reweighter, audit)
    return _cached[3]


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, model=None):
    """pretrain_gpt.py's `loss_func`, reweighted: reads our flags and the iteration from Megatron-LM's args."""
    from megatron.training import get_args  # Megatron-LM, not in the megatron-core wheel

    args = get_args()
    reweighter = _reweighter(args)
    reweighter.step = args.curr_iteration
    result = reweighter.loss_func(loss_mask, output_tensor)
    if _cached[4] is not None:  # --reweight-audit-dir
        _cached[4].after_loss_func()
    return result


class _TrainingStep:
    """Whether Megatron-LM's train_step is running: its forward steps get our loss function, in
    both passes of the global-batch window (the first one runs without grad); evaluation's keep
    the script's own."""

    active = False


def _reweighted_forward_step(forward_step):
    @functools.wraps(forward_step)
    def wrapped(*args, **kwargs):
        output, megatron_loss_func = forward_step(*args, **kwargs)
        if not _TrainingStep.active:  # evaluation: Megatron-LM's own loss and report
            return output, megatron_loss_func
        if not isinstance(megatron_loss_func, functools.partial):
            raise TypeError(
                "forward_step must return partial(loss_func, loss_mask, ...) as pretrain_gpt.py does, "
                f"got {megatron_loss_func!r}"
            )
        return output, functools.partial(loss_func, *megatron_loss_func.args, **megatron_loss_func.keywords)

    return wrapped


def _reweighted_train_step(train_step):
    """Megatron-LM's train_step, its forward-backward run in the reweighting window
    (megatron_reweight.window: in the global-batch window, a forward-only pass first)."""

    @functools.wraps(train_step)
    def wrapped(forward_step_func, data_iterator, model, optimizer, opt_param_scheduler, config,
                forward_backward_func, *args, **kwargs):  # fmt: skip
        from megatron.training import get_args

        reweighter = _reweighter(get_args())
        windowed = functools.partial(window.forward_backward, reweighter, forward_backward_func)
        optimizer_step = optimizer.step

        def step_unless_skipped():  # a skipped step reads as fp16 loss scaling's: no update, counted
            return (False, None, None) if reweighter.skip_update else optimizer_step()

        _TrainingStep.active, optimizer.step = True, step_unless_skipped
        try:
            return train_step(
                forward_step_func, data_iterator, model, optimizer, opt_param_scheduler, config, windowed,
                *args, **kwargs,
            )  # fmt: skip
        finally:
            _TrainingStep.active, optimizer.step = False, optimizer_step

    return wrapped


def _checked_model_provider(model_provider):
    @functools.wraps(model_provider)
    def wrapped(*args, **kwargs):
        from megatron.training import get_args

        check_megatron_args(get_args())
        return model_provider(*args, **kwargs)

    return wrapped


def _keeping_train_dataset(provider):
    @functools.wraps(provider)  # keeps the attributes Megatron-LM reads (is_distributed)
    def wrapped(*args, **kwargs):
        datasets = provider(*args, **kwargs)
        _train_dataset[0] = datasets[0]
        return datasets

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
        provider = call.arguments["train_valid_test_dataset_provider"]
        call.arguments["train_valid_test_dataset_provider"] = _keeping_train_dataset(provider)
        import megatron.training.training as training

        train_step = training.train_step
        training.train_step = _reweighted_train_step(train_step)
        try:
            return pretrain(*call.args, **call.kwargs)
        finally:
            training.train_step = train_step

    return wrapped


def main(argv: list[str] | None = None) -> None:
    """`python -m megatron_reweight.megatron_lm PRETRAIN_SCRIPT [flags...]`: run the script with reweighting."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not argv[0].endswith(".py"):
        sys.exit("usage: python -m megatron_reweight.megatron_lm PATH/pretrain_gpt.py [Megatron-LM, --reweight-* flags]")
    script = os.path.abspath(argv[0])
    if not os.path.isfile(script):
        sys.exit(f"{argv[0]}: no such file; give the pretrain_gpt.py of your Megatron-LM checkout")
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(script))  # as `python pretrain_gpt.py` has it: megatron.training
    try:
        import megatron.training
        import megatron.training.training
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith("megatron"):
            raise
        sys.exit(
            f"{argv[0]}: {error.name} is not importable from its folder: give the pretrain_gpt.py of a Megatron-LM "
            "checkout (megatron/training beside it), or put that checkout on PYTHONPATH"
        )

    calls = []

    def pretrain(*args, **kwargs):
        calls.append(1)
        return reweighted(*args, **kwargs)

    reweighted = with_reweighting(megatron.training.training.pretrain)
    # Both import paths: pretrain_gpt.py imports it from megatron.training.
    megatron.training.pretrain = megatron.training.training.pretrain = pretrain
    try:
        runpy.run_path(script, run_name="__main__")
    except Refused as refusal:  # every rank refuses the same settings: one line, from the first rank
        sys.exit(f"megatron_reweight: {refusal}" if int(os.environ.get("RANK", "0")) == 0 else 1)
    if not calls:
        sys.exit(f"{script} never called megatron.training's pretrain: it trained without reweighting")


if __name__ == "__main__":
    main()
