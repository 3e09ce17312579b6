"""One rank of the distributed-equivalence test (run under torchrun, gloo on CPU).

--phase reference (1 process): builds the tiny Llama GPTModel, saves its weights and a
global batch, and computes with plain autograd the papers' gradient for each weighting window:
    micro-batch:   (1/M) sum_m sum_i w_{m,i} grad f_i,  w_m = compute_weights over micro-batch
                   m's gathered batch (micro-batch x DP samples);
    global-batch:  sum_i w_i grad f_i,  w = compute_weights over all M x micro-batch x DP losses;
f_i = masked mean token loss of sample i.

--phase layout (TP x PP x CP x DP processes): loads the same weights into its shard,
trains one step through megatron's schedules, DDP and finalize_model_grads with the
reweighting loss_func, for each window and loss mode, and checks every rank's weights and
gradient shards against the reference. With dropout on, the global-batch window's two passes
must see the same per-sample losses.
"""

from __future__ import annotations

import argparse
import os
import re
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_reweight.cpu import enable_megatron_core_on_cpu

enable_megatron_core_on_cpu()

from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.utils import get_batch_on_this_cp_rank

from megatron_reweight import ReweightConfig, SampleReweighter, TemperatureSchedule, compute_weights, window
from megatron_reweight.loss import WINDOWS, check_megatron_config, per_sample_losses
from megatron_reweight.model import (
    ModelConfig,
    Recompute,
    build_llama,
    llama_transformer_config,
    transformer_engine_available,
)

SHAPE = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                    num_query_groups=2, seq_length=16)  # fmt: skip
VOCAB = 128
MICRO_BATCH = 2
# One process on a GPU checks the CUDA path (Transformer Engine's layers when installed).
USE_TE = torch.cuda.is_available() and transformer_engine_available()
# (calculate_per_token_loss, average_in_collective): every combination Megatron's DDP accepts.
GRADIENT_TOLERANCE = 1e-5
LOSS_MODES = [(False, False), (False, True), (True, False)]


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=["reference", "layout"], required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--data-parallel", type=int, default=2)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--microbatches", type=int, default=2)
    parser.add_argument("--strategy", default="linupper")
    parser.add_argument("--r", type=float, default=0.5)
    parser.add_argument("--negative-control", action="store_true")
    parser.add_argument(
        "--recompute-method", choices=["block", "uniform"], help="layout phase: full recomputation of one layer per stage"
    )
    return parser.parse_args()


def microbatch_weights(losses: torch.Tensor, args) -> torch.Tensor:
    """Reference weights, one row per microbatch (its gathered batch in DP-rank order)."""
    rows = losses.view(args.microbatches, -1)
    return torch.stack([compute_weights(row, args.strategy, r=args.r) for row in rows])


def reference(args) -> None:
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    model = build_llama(SHAPE, llama_transformer_config(SHAPE), VOCAB, use_transformer_engine=USE_TE)

    samples = args.microbatches * MICRO_BATCH * args.data_parallel
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (samples, SHAPE.seq_length + 1), generator=generator)
    loss_mask = (torch.rand(samples, SHAPE.seq_length, generator=generator) < 0.8).float()
    loss_mask[1] = 0.0  # an all-masked sample: weight 0, no contribution

    tokens, loss_mask = tokens.cuda(), loss_mask.cuda()  # no-ops on CPU
    positions = torch.arange(SHAPE.seq_length).expand(samples, -1).cuda()
    counts = loss_mask.sum(dim=1)
    valid = counts > 0

    def sample_losses():  # f_i with autograd (0 where invalid); megatron's cross-entropy backward runs once
        per_token = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:])
        return torch.where(valid, (per_token * loss_mask).sum(dim=1) / counts.clamp(min=1), 0.0)

    losses = torch.where(valid, sample_losses().detach(), torch.nan)
    # Rows are in the sampler's order (micro-batch, DP rank, sample): the global window is all of them.
    weights = {
        "micro-batch": microbatch_weights(losses, args),
        "global-batch": compute_weights(losses, args.strategy, r=args.r),
    }
    microbatch_share = {"micro-batch": 1 / args.microbatches, "global-batch": 1.0}
    names, params = zip(*model.named_parameters())
    grads = {}
    for window_name in WINDOWS:
        objective = (weights[window_name].flatten() * sample_losses()).sum() * microbatch_share[window_name]
        grads[window_name] = dict(zip(names, torch.autograd.grad(objective, params)))

    torch.save(
        {
            "weights_init": {name: p.detach().clone() for name, p in zip(names, params)},
            "grads": grads,
            "tokens": tokens,
            "loss_mask": loss_mask,
            "sample_weights": weights,
        },
        args.workdir / "reference.pt",
    )


def global_name(local_name: str, layer_offset: int) -> str:
    return re.sub(
        r"decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", local_name
    )


def tensor_parallel_shard(name: str, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This TP rank's part of a full parameter (megatron's column/row-parallel layouts)."""
    if name.endswith("linear_fc1.weight"):  # SwiGLU: gate and up halves are split separately
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]])
    if name.endswith(("linear_qkv.weight", "word_embeddings.weight", "output_layer.weight")):
        return full.chunk(size, dim=0)[rank]
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return full.chunk(size, dim=1)[rank]
    return full  # norms are replicated


def local_reference(tensors: dict, model, args) -> dict:
    layer_offset = parallel_state.get_pipeline_model_parallel_rank() * (SHAPE.num_layers // args.pp)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    return {
        name: tensor_parallel_shard(name, tensors[global_name(name, layer_offset)], tp_rank, args.tp)
        for name, _ in model.named_parameters()
    }


def microbatches(reference_data: dict, args):
    """Megatron's sampler order: microbatch m, DP rank d takes rows m*B + d*mbs + [0, mbs)."""
    dp_rank = parallel_state.get_data_parallel_rank()
    gathered = MICRO_BATCH * args.data_parallel
    for m in range(args.microbatches):
        start = m * gathered + dp_rank * MICRO_BATCH
        tokens = reference_data["tokens"][start : start + MICRO_BATCH]
        batch = {
            "tokens": tokens[:, :-1].contiguous(),
            "labels": tokens[:, 1:].contiguous(),
            "loss_mask": reference_data["loss_mask"][start : start + MICRO_BATCH],
            "position_ids": torch.arange(SHAPE.seq_length, device=tokens.device).expand(MICRO_BATCH, -1).contiguous(),
        }
        yield get_batch_on_this_cp_rank(batch)


def check_negative_control(output_tensor, loss_mask, expected_local_weights) -> None:
    """Gathering over every rank (TP duplicates included) must NOT reproduce the reference weights."""
    losses = per_sample_losses(output_tensor, loss_mask, parallel_state.get_context_parallel_group()).losses
    everywhere = losses.new_empty(dist.get_world_size() * losses.numel())
    dist.all_gather_into_tensor(everywhere, losses)
    wrong = compute_weights(everywhere, "linupper", r=0.5).view(dist.get_world_size(), -1)[dist.get_rank()]
    assert not torch.allclose(wrong, expected_local_weights, atol=1e-4), "negative control: world gather matched"


def build_ddp_model(args, reference_data: dict, per_token_loss: bool, average_in_collective: bool, dropout=0.0):
    """This rank's shard of the reference model, wrapped in megatron's DDP as a trainer does."""
    recompute = Recompute("full", args.recompute_method, 1) if args.recompute_method else Recompute()
    config = llama_transformer_config(SHAPE, calculate_per_token_loss=per_token_loss, recompute=recompute)
    config.hidden_dropout = config.attention_dropout = dropout
    model = build_llama(SHAPE, config, VOCAB, use_transformer_engine=USE_TE)
    initial = local_reference(reference_data["weights_init"], model, args)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(initial[name])
    ddp_model = DistributedDataParallel(
        config, DistributedDataParallelConfig(average_in_collective=average_in_collective), model
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp_model.no_sync
    return model, ddp_model


def train_step(args, reference_data: dict, ddp_model, reweighter: SampleReweighter, loss_func) -> list[dict]:
    """One forward-backward step over the reference batch in the reweighter's window."""

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(loss_func, batch["loss_mask"])

    ddp_model.zero_grad_buffer()
    return window.forward_backward(
        reweighter,
        get_forward_backward_func(),
        forward_step_func=forward_step,
        data_iterator=microbatches(reference_data, args),
        model=[ddp_model],
        num_microbatches=args.microbatches,
        seq_length=SHAPE.seq_length,
        micro_batch_size=MICRO_BATCH,
    )


def check_loss_mode(args, reference_data: dict, window_name: str, per_token_loss: bool, average_in_collective: bool):
    """One training step in this window and loss mode; assert weights and gradient shards equal
    the reference. Returns the step's weights on the last pipeline stage (one row per window)."""
    mode = f"{window_name} window, per_token_loss={per_token_loss} average_in_collective={average_in_collective}"
    check_megatron_config(per_token_loss, average_in_collective)
    model, ddp_model = build_ddp_model(args, reference_data, per_token_loss, average_in_collective)
    expected_weights = reference_data["sample_weights"][window_name]
    dp_rank = parallel_state.get_data_parallel_rank()
    reweighter = SampleReweighter.from_parallel_state(
        ReweightConfig(args.strategy, TemperatureSchedule(r=args.r), window=window_name)
    )
    recorded = []

    def loss_func(loss_mask, output_tensor):
        result = reweighter.loss_func(loss_mask, output_tensor)
        if window_name == "micro-batch":  # each micro-batch is its own window
            recorded.append(reweighter.last_weights.clone())
            if args.negative_control:
                expected_local = expected_weights.view(args.microbatches, args.data_parallel, MICRO_BATCH)[:, dp_rank]
                check_negative_control(output_tensor, loss_mask, expected_local[len(recorded) - 1])
        return result

    train_step(args, reference_data, ddp_model, reweighter, loss_func)

    weights = None
    if parallel_state.is_pipeline_last_stage():
        weights = torch.stack(recorded) if window_name == "micro-batch" else reweighter.last_weights
        torch.testing.assert_close(
            weights, expected_weights, rtol=1e-4, atol=1e-6, msg=lambda m: f"weights, {mode}: {m}"
        )
    expected_grads = local_reference(reference_data["grads"][window_name], model, args)
    for name, param in model.named_parameters():
        # Relative to the tensor's norm: fp32 sums in another order differ by ~1e-7 of it,
        # a wrong scaling (x DP, x CP, x microbatches) by 0.5 or more.
        error = (param.main_grad - expected_grads[name]).norm() / expected_grads[name].norm()
        assert error < GRADIENT_TOLERANCE, f"grad {name}, {mode}: relative error {error:.2e}"
    return weights


def check_windows_differ(weights: dict, args) -> None:
    """Negative control: on the same step the per-micro-batch weights (as shares of the whole
    step, divided by M) are not the global-batch window's."""
    per_microbatch = weights["micro-batch"].flatten() / args.microbatches
    assert not torch.allclose(per_microbatch, weights["global-batch"], rtol=1e-3, atol=1e-6), (
        "negative control: the micro-batch window gave the global-batch window's weights"
    )


def forward_only_losses(args, reference_data: dict, ddp_model) -> torch.Tensor | None:
    """Per-sample losses of one plain forward-only pass over the step (last stage; else None)."""
    recorded = []

    def loss_func(loss_mask, output_tensor):
        losses = per_sample_losses(output_tensor, loss_mask, parallel_state.get_context_parallel_group()).losses
        recorded.append(losses)
        return losses.sum(), torch.ones((), dtype=torch.int), {}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(loss_func, batch["loss_mask"])

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=microbatches(reference_data, args), model=[ddp_model],
            num_microbatches=args.microbatches, seq_length=SHAPE.seq_length, micro_batch_size=MICRO_BATCH,
            forward_only=True,
        )  # fmt: skip
    return torch.cat(recorded) if recorded else None


def check_replayed_randomness(args, reference_data: dict) -> None:
    """With dropout on, pass 2 of the global-batch window recomputes pass 1's per-sample losses
    exactly (the RNG states were restored: same masks), while two plain passes draw other masks."""
    _, ddp_model = build_ddp_model(args, reference_data, False, False, dropout=0.3)
    reweighter = SampleReweighter.from_parallel_state(
        ReweightConfig(args.strategy, TemperatureSchedule(r=args.r), window="global-batch")
    )
    reports = train_step(args, reference_data, ddp_model, reweighter, reweighter.loss_func)
    plain = [forward_only_losses(args, reference_data, ddp_model) for _ in range(2)]
    if parallel_state.is_pipeline_last_stage():
        drift = torch.stack([report["window loss drift"][0] for report in reports])
        assert len(reports) == args.microbatches and torch.all(drift == 0), f"window loss drift {drift.tolist()}"
        assert not torch.allclose(plain[0], plain[1], equal_nan=True), "negative control: dropout drew the same masks"


def backend_averages() -> bool:
    """Whether the process group reduces with ReduceOp.AVG (average_in_collective needs it):
    NCCL does, gloo only in newer torch releases. The op is refused before any communication."""
    try:
        dist.all_reduce(torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu"), op=dist.ReduceOp.AVG)
    except (RuntimeError, ValueError):
        return False
    return True


def layout(args) -> None:
    parallel_state.initialize_model_parallel(args.tp, args.pp, context_parallel_size=args.cp)
    model_parallel_cuda_manual_seed(1234)
    assert parallel_state.get_data_parallel_world_size() == args.data_parallel
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference_data = torch.load(args.workdir / "reference.pt", map_location=device)
    for per_token_loss, average_in_collective in LOSS_MODES:
        if average_in_collective and not backend_averages():
            print(
                f"rank {dist.get_rank()}: average_in_collective not checked: gloo of torch {torch.__version__} "
                "has no ReduceOp.AVG"
            )
            continue
        weights = {w: check_loss_mode(args, reference_data, w, per_token_loss, average_in_collective) for w in WINDOWS}
    if parallel_state.is_pipeline_last_stage():
        check_windows_differ(weights, args)
    check_replayed_randomness(args, reference_data)
    print(f"rank {dist.get_rank()}: weights and gradients match the reference")


def main() -> None:
    args = parse_args()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
        torch.set_num_threads(1)
    reference(args) if args.phase == "reference" else layout(args)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
