"""CPU runs: make `Tensor.type()` answer CUDA type names, for megatron-core's optimizers.

megatron-core's optimizers sort parameters by `param.type()` strings
('torch.cuda.FloatTensor', 'torch.cuda.BFloat16Tensor', ...) and `clip_grads` asserts
`grad.type() == 'torch.cuda.FloatTensor'`; on CPU the names lack ".cuda". This mode, a
companion of `megatron_reweight.cpu` (CUDA requests -> CPU), reports CPU tensors' types
under their CUDA names and maps a CUDA type given to `Tensor.type(...)` to the CPU one.
Active only on CPU runs, after `enable_megatron_core_on_cpu()`.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_mode: TorchFunctionMode | None = None


class _CudaTypeNamesMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type:
            if len(args) == 1 and not kwargs:
                name = func(*args)
                return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
            if len(args) == 2 and isinstance(args[1], str) and args[1].startswith("torch.cuda."):
                args = (args[0], args[1].replace("torch.cuda.", "torch.", 1))
        return func(*args, **kwargs)


def report_cuda_tensor_types() -> None:
    """Install the mode for this process (idempotent; no-op with CUDA)."""
    global _mode
    if _mode is not None or torch.cuda.is_available():
        return
    _mode = _CudaTypeNamesMode()
    _mode.__enter__()
