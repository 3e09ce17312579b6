"""Checks of megatron_reweight.cpu in a fresh process (the redirection is process-wide)."""

import torch
import torch.distributed as dist

from megatron_reweight.cpu import enable_megatron_core_on_cpu, megatron_core_on_cpu

assert not megatron_core_on_cpu()
enable_megatron_core_on_cpu()
assert megatron_core_on_cpu()

from megatron.core import parallel_state, tensor_parallel  # noqa: E402

# CUDA device requests land on the CPU.
assert torch.empty(3, device="cuda").device.type == "cpu"
assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
assert torch.ones(2).cuda().device.type == "cpu"
assert torch.ones(2).to("cuda:0").device.type == "cpu"
# megatron's optimizers read CUDA type names.
assert torch.ones(2).type() == "torch.cuda.FloatTensor"
assert torch.ones(2).type("torch.cuda.HalfTensor").dtype == torch.float16

# The model-parallel RNG tracker forks a reproducible stream that leaves the default one untouched.
dist.init_process_group("gloo")
parallel_state.initialize_model_parallel(1, 1)
tensor_parallel.model_parallel_cuda_manual_seed(42)
tracker = tensor_parallel.get_cuda_rng_tracker()
before = torch.get_rng_state()
with tracker.fork():
    first = torch.rand(4)
assert torch.equal(torch.get_rng_state(), before), "fork must restore the default generator"
with tracker.fork():
    second = torch.rand(4)
assert not torch.equal(first, second), "the forked stream advances between forks"
tensor_parallel.model_parallel_cuda_manual_seed(42, force_reset_rng=True)
with tensor_parallel.get_cuda_rng_tracker().fork():
    assert torch.equal(torch.rand(4), first), "the same seed gives the same forked stream"
print("cpu layer ok")
dist.destroy_process_group()
