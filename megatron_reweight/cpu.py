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
absent; it is tested against the oldest and the newest megatron-core of the declared range
(0.14.0 and 0.16.1, .ci/run).

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
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
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


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 over a group; the backward sums gradients and keeps this rank's part."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        size = torch.distributed.get_world_size(ctx.group)
        rank = torch.distributed.get_rank(ctx.group)
        return grad.chunk(size, dim=0)[rank], None


class ContextParallelCoreAttention(MegatronModule):
    """Causal core attention for context parallelism without Transformer Engine.

    Each CP rank holds sequence chunks (rank, 2*CP-1-rank) of 2*CP (megatron's
    load-balanced split). Keys and values are all-gathered over the CP group and the
    causal mask is built from the chunks' global positions. Made for CPU runs and
    tests, where sequences are short; on GPUs Transformer Engine's ring attention is used.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"ContextParallelCoreAttention supports causal masks only, got {attn_mask_type}")
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
        self.cp_group = parallel_state.get_context_parallel_group()

    def _chunk_positions(self, chunk_length: int, rank: int, device) -> torch.Tensor:
        cp_size = torch.distributed.get_world_size(self.cp_group)
        chunks = (rank, 2 * cp_size - 1 - rank)
        return torch.cat([torch.arange(c * chunk_length, (c + 1) * chunk_length, device=device) for c in chunks])

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        # query [sq, b, np, hn]; key, value [sq, b, ng, hn] for this rank's two chunks.
        cp_size = torch.distributed.get_world_size(self.cp_group)
        chunk_length = query.shape[0] // 2
        key = _GatherSequence.apply(key, self.cp_group)
        value = _GatherSequence.apply(value, self.cp_group)
        query_positions = self._chunk_positions(chunk_length, torch.distributed.get_rank(self.cp_group), query.device)
        key_positions = torch.cat([self._chunk_positions(chunk_length, r, query.device) for r in range(cp_size)])

        heads_per_group = query.shape[2] // key.shape[2]
        key = key.repeat_interleave(heads_per_group, dim=2)
        value = value.repeat_interleave(heads_per_group, dim=2)
        # [b, np, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.softmax_scale
        future = key_positions[None, :] > query_positions[:, None]
        probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1).to(v.dtype)
        context = torch.matmul(probs, v)  # [b, np, sq, hn]
        return context.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)
