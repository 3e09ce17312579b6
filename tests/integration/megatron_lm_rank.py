"""One rank of test_megatron_lm.py: Megatron-LM's unmodified pretrain_gpt.py on CPU.

    python megatron_lm_rank.py plain|reweighted PATH/pretrain_gpt.py [flags...]

`plain` runs the script as it is; `reweighted` runs it through `megatron_reweight.megatron_lm`.
Instrumentation (observes, changes nothing unless asked), set by environment variables:
  MEGATRON_LM_RECORD=DIR   each rank writes DIR/rank<r>.pt: per training iteration the reduced
                           report and grad norm (from train_step's return, at full precision)
                           and every microbatch's per-token losses and loss mask (from GPTModel)
  MEGATRON_LM_NAN_AT=ITER  at that 0-based iteration, the first token of rank 0's first sample
                           (first microbatch) gets a NaN loss: a numeric fault in the model's output
  MEGATRON_LM_NAN_ACTIVATION_AT=ITER  at that 0-based iteration, rank 0's first sample (first
                           microbatch) gets NaN hidden states after the first transformer layer: an
                           overflow in its activations, which reaches every weight's gradient
"""

import atexit
import os
import sys

import torch

from megatron_reweight.cpu import enable_megatron_lm_on_cpu

mode, script, *flags = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # megatron.training from the checkout
enable_megatron_lm_on_cpu()

import megatron.training.training as training  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.transformer.transformer_layer import TransformerLayer  # noqa: E402
from megatron.training import get_args  # noqa: E402

RANK = int(os.environ.get("RANK", 0))
RECORD = os.environ.get("MEGATRON_LM_RECORD")
NAN_AT = os.environ.get("MEGATRON_LM_NAN_AT")
NAN_ACTIVATION_AT = os.environ.get("MEGATRON_LM_NAN_ACTIVATION_AT")
record = {"iterations": {}, "microbatches": []}
poisoned = []
poisoned_activations = []


def on_first_layer_output(module, args, output):
    """NaN hidden states ([s, b, h]) for sample 0 of the first grad-enabled micro-batch of NAN_ACTIVATION_AT."""
    iteration = get_args().curr_iteration
    if int(NAN_ACTIVATION_AT) != iteration or RANK != 0 or poisoned_activations or not torch.is_grad_enabled():
        return None
    poisoned_activations.append(iteration)
    hidden, *rest = output if isinstance(output, tuple) else (output,)
    hidden = hidden.clone()
    hidden[:, 0] = float("nan")
    return (hidden, *rest) if isinstance(output, tuple) else hidden


def on_model_built(module, args, kwargs, output):
    """Hook the first transformer layer (layer_number 1) once it exists."""
    if isinstance(module, TransformerLayer) and module.layer_number == 1 and not hasattr(module, "_nan_hooked"):
        module._nan_hooked = module.register_forward_hook(on_first_layer_output)
    return None


def on_model_output(module, args, kwargs, output):
    if not isinstance(module, GPTModel) or not torch.is_grad_enabled():
        return None
    iteration = get_args().curr_iteration
    if NAN_AT is not None and int(NAN_AT) == iteration and RANK == 0 and not poisoned:
        poisoned.append(iteration)
        output = output.clone()
        output[0, 0] = float("nan")
    if RECORD:
        record["microbatches"].append(
            {"iteration": iteration, "losses": output.detach().clone(), "loss_mask": kwargs["loss_mask"].clone()}
        )
    return output


def recorded_train_step(*args, **kwargs):
    result = train_step(*args, **kwargs)
    loss_dict, skipped, should_exit, grad_norm = result[0], result[1], result[3], result[5]
    if should_exit:  # the rerun state machine stopped the iteration
        return result
    record["iterations"][get_args().curr_iteration] = {
        **{key: float(value) for key, value in loss_dict.items()},
        "grad norm": float("nan") if grad_norm is None else float(grad_norm),
        "skipped": bool(skipped),
    }
    return result


torch.nn.modules.module.register_module_forward_hook(on_model_output, with_kwargs=True)
if NAN_ACTIVATION_AT is not None:
    torch.nn.modules.module.register_module_forward_hook(on_model_built, with_kwargs=True)
if RECORD:
    train_step = training.train_step
    training.train_step = recorded_train_step
    atexit.register(lambda: torch.save(record, os.path.join(RECORD, f"rank{RANK}.pt")))

if mode == "reweighted":
    from megatron_reweight.megatron_lm import main

    main([script, *flags])
else:
    import runpy

    sys.argv = [script, *flags]
    runpy.run_path(script, run_name="__main__")
