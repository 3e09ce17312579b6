"""Run the real megatron-core on CPU (gloo), for tests, CI and CPU runs.

megatron-core asks for CUDA in many places (`torch.cuda.current_device()`,
`device="cuda"`, `.cuda()`, the model-parallel CUDA RNG tracker). Rather than
fork it, this module redirects those requests to the CPU:

* a TorchFunctionMode rewrites CUDA device arguments to CPU, makes `Tensor.cuda()` a
  no-op, and has `Tensor.type()` answer CUDA type names ('torch.cuda.FloatTensor', ...),
  which megatron-core's optimizers sort parameters by and `clip_grads` asserts;
* `torch.cuda.current_device` answers device 0 (which the mode maps to CPU),
  `torch.cuda.synchronize` does nothing;
* the CUDA RNG tracker is backed by the CPU default generator (on CPU every
  random op draws from it, so that is the generator the tracker must fork).
* the MoE router's gating, which in 0.16.1 names Transformer Engine's `te_general_gemm`
  even where Transformer Engine is missing (a NameError), is told it is absent.

It is active only after `enable_megatron_core_on_cpu()` and only when CUDA is
absent; it is tested against the pinned megatron-core version (0.16.1).

`enable_megatron_lm_on_cpu()` adds what Megatron-LM's own training loop (core_v0.16.1,
`megatron.training`) needs on top, for tests that run its unmodified pretrain_gpt.py on CPU:
`initialize_megatron` without its CUDA assertion, one "device" so model-parallel groups are
built and the RNG tracker seeded, GPU architecture 0 where the flags' checks ask for it, no
dataset-helper or fused-kernel compilation (the wheel ships the helpers compiled; the kernels
need nvcc), no-op CUDA streams, and no torch.compile
(Megatron-LM warms up its fused kernels at start-up, which on CPU runs a C++ compiler in every
process, for kernels that the CPU flags --no-bias-*-fusion leave unused).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_enabled_mode: TorchFunctionMode | None = None


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal in torch's device arguments.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type:
            if len(args) == 1 and not kwargs:
                name = func(*args)
                return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
            if len(args) == 2 and isinstance(args[1], str) and args[1].startswith("torch.cuda."):
                args = (args[0], args[1].replace("torch.cuda.", "torch.", 1))
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


def enable_megatron_core_on_cpu() -> None:
    """Install the CPU redirection for this process (idempotent). No-op with CUDA."""
    global _enabled_mode
    if _enabled_mode is not None or torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random as megatron_random
    from megatron.core.transformer.moe import moe_utils

    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.manual_seed = torch.manual_seed
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    _enabled_mode = _CudaToCpuMode()
    _enabled_mode.__enter__()


def megatron_core_on_cpu() -> bool:
    """True when this process runs megatron-core through the CPU redirection."""
    return _enabled_mode is not None


class _NoStream:
    """torch.cuda.Stream on CPU: every operation is already ordered."""

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


def enable_megatron_lm_on_cpu() -> None:
    """`enable_megatron_core_on_cpu()` plus Megatron-LM's training loop (idempotent; no-op with CUDA).
    Call before `megatron.training.pretrain` runs."""
    if torch.cuda.is_available():
        return
    enable_megatron_core_on_cpu()
    import megatron.core.datasets.utils as dataset_utils
    import megatron.legacy.fused_kernels as fused_kernels
    import megatron.training.arguments as arguments
    import megatron.training.training as training

    torch._dynamo.config.disable = True
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda device: None
    torch.cuda.Stream = _NoStream
    torch.cuda.current_stream = lambda device=None: _NoStream()
    torch.cuda.stream = lambda stream: contextlib.nullcontext()
    arguments.get_device_arch_version = lambda: 0
    dataset_utils.compile_helpers = lambda: None
    fused_kernels.load = lambda args: None
    if not isinstance(training.initialize_megatron, functools.partial):
        training.initialize_megatron = functools.partial(training.initialize_megatron, allow_no_cuda=True)
