"""One rank of test_megatron_lm.py: Megatron-LM's unmodified pretrain_gpt.py on CPU.

    python megatron_lm_rank.py plain|reweighted PATH/pretrain_gpt.py [flags...]

`plain` runs the script as it is; `reweighted` runs it through `megatron_reweight.megatron_lm`.
Instrumentation (observes, changes nothing unless asked), set by environment variables:
  MEGATRON_LM_RECORD=DIR   each rank writes DIR/rank<r>.pt: per training iteration the reduced
                           report and grad norm (from train_step's return, at full precision)
                           and every microbatch's per-token losses and loss mask (from GPTModel)
  MEGATRON_LM_NAN_AT=ITER  at that 0-based iteration, the first token of rank 0's first sample
                           (first microbatch) gets a NaN loss: a numeric fault in the model's output
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
from megatron.training import get_args  # noqa: E402

RANK = int(os.environ.get("RANK", 0))
RECORD = os.environ.get("MEGATRON_LM_RECORD")
NAN_AT = os.environ.get("MEGATRON_LM_NAN_AT")
record = {"iterations": {}, "microbatches": []}
poisoned = []


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
    loss_dict, grad_norm = result[0], result[5]
    if grad_norm is None:  # the rerun state machine stopped the iteration
        return result
    record["iterations"][get_args().curr_iteration] = {
        **{key: float(value) for key, value in loss_dict.items()},
        "grad norm": float(grad_norm),
    }
    return result


torch.nn.modules.module.register_module_forward_hook(on_model_output, with_kwargs=True)
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
