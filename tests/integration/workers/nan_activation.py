"""pretrain_llama.py with one sample's hidden states turned NaN at one forward call (as a bf16
overflow in that sample's activations would), by a forward hook on the first transformer layer.

    python nan_activation.py CALL [pretrain_llama.py flags]

Prints, as its last line, JSON: whether every parameter is finite after the run, and whether
the parameters were unchanged across the poisoned step and changed across the next one.
"""

import json
import sys

import torch

from megatron_reweight.training import trainer

POISONED_CALL = int(sys.argv.pop(1))
calls = 0
snapshots: dict[int, list[torch.Tensor]] = {}
models: list[torch.nn.Module] = []


def _decoder(chunk: torch.nn.Module) -> torch.nn.Module:
    while not hasattr(chunk, "decoder"):  # DistributedDataParallel (and Float16Module) wrap the GPTModel
        chunk = chunk.module
    return chunk.decoder


def poison_one_sample(module, inputs, output):
    global calls
    calls += 1
    if POISONED_CALL <= calls <= POISONED_CALL + 2:  # the parameters before, after and one step after
        snapshots[calls] = [p.detach().clone() for p in models[0].parameters()]
    if calls != POISONED_CALL:
        return output
    hidden = output[0].clone()
    hidden[:, 1] = float("nan")  # [sequence, batch, hidden]: sample 1 of the micro-batch
    return (hidden, *output[1:])


def build_model_with_nan_hook(config, padded_vocab_size):
    model = build_model(config, padded_vocab_size)
    models.extend(model)
    _decoder(model[0]).layers[0].register_forward_hook(poison_one_sample)
    return model


build_model = trainer.build_model
trainer.build_model = build_model_with_nan_hook
code = trainer.main()
if code:  # stopped (e.g. by the NaN check without --reweight-skip-nonfinite-samples)
    sys.exit(code)
same = lambda a, b: all(torch.equal(x, y) for x, y in zip(snapshots[a], snapshots[b]))  # noqa: E731
print(json.dumps({
    "finite": all(bool(p.isfinite().all()) for p in models[0].parameters()),
    "unchanged_by_poisoned_step": same(POISONED_CALL, POISONED_CALL + 1),
    "changed_by_next_step": not same(POISONED_CALL + 1, POISONED_CALL + 2),
}))
sys.exit(code)
