"""One rank of test_moe_reweighting (torchrun, 2 data-parallel ranks, gloo on CPU).

A tiny MoE GPTModel (megatron-core's local MoE layer, auxiliary load-balancing loss) trains
one step of 2 microbatches through megatron's schedule, DDP and finalize_model_grads with the
reweighting loss_func. Every rank checks its gradient against a single-process reference of
    (1/M) sum_m sum_i w_{m,i} grad f_i  +  the router's auxiliary losses at scale 1/(M x DP),
which is what Megatron gives an unweighted run: each forward's auxiliary loss scaled by
1/M in the schedule and averaged over DP. A negative control shows the auxiliary gradient is
large enough that a wrong scale would fail.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
import torch.distributed as dist

from megatron_reweight.cpu import enable_megatron_core_on_cpu

enable_megatron_core_on_cpu()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.distributed import (  # noqa: E402
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler  # noqa: E402

from megatron_reweight import ReweightConfig, SampleReweighter, TemperatureSchedule, compute_weights  # noqa: E402
from megatron_reweight.model import ModelConfig, llama_transformer_config  # noqa: E402

SHAPE = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                    num_query_groups=2, seq_length=16)  # fmt: skip
VOCAB = 64
EXPERTS, MICRO_BATCH, MICROBATCHES = 4, 2, 2
STRATEGY, R = "linupper", 0.5

dist.init_process_group("gloo")
parallel_state.initialize_model_parallel(1, 1)
DP, RANK = dist.get_world_size(), dist.get_rank()
config = replace(
    llama_transformer_config(SHAPE), num_moe_experts=EXPERTS, moe_router_topk=2, moe_aux_loss_coeff=1.0,
    moe_router_load_balancing_type="aux_loss", moe_token_dispatcher_type="allgather",
)  # fmt: skip


def build() -> GPTModel:
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(EXPERTS, moe_grouped_gemm=False, normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SHAPE.seq_length,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )


# The global batch, [microbatch, DP rank, sample, token], with ragged loss masks.
generator = torch.Generator().manual_seed(1)
shape = (MICROBATCHES, DP, MICRO_BATCH, SHAPE.seq_length)
tokens = torch.randint(0, VOCAB, shape, generator=generator)
labels = torch.randint(0, VOCAB, shape, generator=generator)
loss_mask = (torch.rand(shape, generator=generator) < 0.8).float()
positions = torch.arange(SHAPE.seq_length)[None, :].expand(MICRO_BATCH, -1)


def reference_grads(aux_scale: float) -> dict[str, torch.Tensor]:
    """One process, plain autograd: each DP rank's microbatch forwarded in turn."""
    model = build()
    total = 0.0
    for m in range(MICROBATCHES):
        losses = []
        for r in range(DP):
            per_token = model(tokens[m, r], positions, None, labels=labels[m, r])
            losses.append((per_token * loss_mask[m, r]).sum(1) / loss_mask[m, r].sum(1))
        losses = torch.cat(losses)
        total = total + (compute_weights(losses.detach(), STRATEGY, r=R) * losses).sum() / MICROBATCHES
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor([aux_scale]))  # shaped as Megatron sets it
    total.backward()
    return {name: param.grad for name, param in model.named_parameters()}


def reweighted_grads() -> dict[str, torch.Tensor]:
    model = build()
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    reweighter = SampleReweighter.from_parallel_state(ReweightConfig(STRATEGY, TemperatureSchedule(r=R)))

    def forward_step(data_iterator, model):
        m = next(data_iterator)
        output = model(tokens[m, RANK], positions, None, labels=labels[m, RANK])
        return output, partial(reweighter.loss_func, loss_mask[m, RANK])

    ddp.zero_grad_buffer()
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(range(MICROBATCHES)), model=[ddp],
        num_microbatches=MICROBATCHES, seq_length=SHAPE.seq_length, micro_batch_size=MICRO_BATCH,
    )  # fmt: skip
    return {name: param.main_grad for name, param in model.named_parameters()}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


expected = reference_grads(aux_scale=1.0 / (MICROBATCHES * DP))
without_aux = reference_grads(aux_scale=0.0)
actual = reweighted_grads()
router = [name for name in expected if "router" in name]
assert router, "the model has no MoE router"
for name in router:  # the negative control: the auxiliary loss moves the router's gradient
    assert relative_error(without_aux[name], expected[name]) > 1e-2, name
for name, grad in expected.items():
    error = relative_error(actual[name], grad)
    assert error < 1e-5, f"rank {RANK}: grad {name}: relative error {error:.2e}"
print(f"rank {RANK}: MoE gradients match the single-process reference")
dist.destroy_process_group()
