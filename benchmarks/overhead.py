"""Overhead of sample reweighting on a real megatron-core training step.

One process group trains one tiny Llama GPTModel (megatron-core forward-backward
schedule, megatron DDP, megatron Adam step) and times whole training steps whose
only difference is the Megatron `loss_func`:

* `plain`: Megatron-LM's pretrain_gpt.py loss (sum of masked token losses,
  token count, report); the true baseline, with no gather and no weights;
* every plugin strategy through `SampleReweighter.loss_func`, `uniform` included
  (it still computes per-sample losses, all-gathers them over DP and weights them).

The variants are interleaved: each round runs one step of every variant in a fresh
random order (the same order on every rank), the first rounds are discarded as
warm-up, and each step is compared with the plain step of the same round. The
paired ratios cancel the machine's slow drifts; we report their median, IQR and a
bootstrap 95% CI of the median. A step's time is the slowest rank's.

A second, finer measurement times the loss function alone (forward and backward
through it, on a [micro-batch, seq] per-token loss tensor, all-gather included)
and converts the difference to plain into a predicted fraction of the step.

Finally the all-gather's traffic for paper 1's 7B layout is set against the
gradient all-reduce / reduce-scatter, analytically.

Run:  python -m benchmarks.overhead       (launches DP=1 and DP=2 under torchrun; 5-10 min on 2 cores)
Out:  docs/results/overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import torch

from benchmarks.results_doc import REPO_ROOT, RESULTS_DIR, write_results_section
from megatron_reweight.launch import local_torchrun
from megatron_reweight.training.config import preset_config

DEFAULT_OUT = RESULTS_DIR / "overhead.json"
PLAIN = "plain"
# A second, identical plain variant: the A/A control. Its ratio to plain shows how finely
# this machine can resolve a step-time difference at all.
PLAIN_REPEAT = "plain-repeat"


@dataclass(frozen=True)
class OverheadConfig:
    preset: str = "tiny"  # model shape and batch sizes of one of the trainer's presets
    vocab_size: int = 4096
    # cpu: fp32, megatron-core through megatron_reweight.cpu, gloo. cuda: one GPU per rank, NCCL,
    # bf16 with fp32 main weights and Transformer Engine layers when importable, as the trainer.
    device: str = "cpu"
    # None: the preset's.
    num_layers: int | None = None
    seq_length: int | None = None
    micro_batch_size: int | None = None
    num_microbatches: int | None = None
    variants: tuple[str, ...] = (
        PLAIN,
        PLAIN_REPEAT,
        "uniform",
        "linupper",
        "quadratic",
        "extremes",
        "capped",
        "irdro",
        "midranking",
    )
    rounds: int = 80
    warmup_rounds: int = 5
    loss_func_repeats: int = 400  # per variant, for the loss-function-only timing
    threads_per_rank: int = 1  # 2 cores: one thread per rank at DP=2, and the same at DP=1
    seed: int = 0
    bootstrap_samples: int = 2000


# --- the baseline loss: Megatron-LM pretrain_gpt.py ---------------------------------------


def plain_loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """pretrain_gpt.py's loss_func (megatron-core 0.16 contract), without its NaN/spike checks:
    sum of the masked token losses, the token count, and the [sum, count] report."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])
    return loss, num_tokens, {"lm loss": report}


# --- worker: runs under torchrun ------------------------------------------------------------


def build_training(cfg: OverheadConfig):
    """A Llama GPTModel + megatron DDP + megatron Adam, on CPU or one GPU per rank; returns
    what a step needs."""
    import torch.distributed as dist

    on_gpu = cfg.device == "cuda"
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        from megatron_reweight.cpu import enable_megatron_core_on_cpu

        enable_megatron_core_on_cpu()
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.module import Float16Module

    from megatron_reweight.model import build_llama, llama_transformer_config, transformer_engine_available

    dist.init_process_group("nccl" if on_gpu else "gloo")
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(cfg.seed)
    preset = preset_config(cfg.preset)
    o = preset.optim
    shape = replace(
        preset.model,
        num_layers=cfg.num_layers or preset.model.num_layers,
        seq_length=cfg.seq_length or preset.model.seq_length,
    )
    config = llama_transformer_config(shape, bf16=on_gpu)
    model = build_llama(shape, config, cfg.vocab_size, use_transformer_engine=on_gpu and transformer_engine_available())
    if on_gpu:
        model = Float16Module(config, model.cuda())  # bf16 parameters, fp32 losses: as Megatron-LM's get_model
    model = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=on_gpu), model)
    config.finalize_model_grads_func = finalize_model_grads  # DDP grad all-reduce inside the schedule
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=o.lr, weight_decay=o.weight_decay, clip_grad=o.clip_grad,
            bf16=on_gpu, params_dtype=torch.bfloat16 if on_gpu else torch.float32,
        ),
        [model],
    )  # fmt: skip
    micro_batch_size = cfg.micro_batch_size or o.micro_batch_size
    num_microbatches = cfg.num_microbatches or o.global_batch_size // (micro_batch_size * dist.get_world_size())
    return model, optimizer, shape, micro_batch_size, num_microbatches


def synchronize(cfg: OverheadConfig) -> None:
    """Wait for the GPU's queued work, so that a wall-clock reading covers it."""
    if cfg.device == "cuda":
        torch.cuda.synchronize()


def make_batches(shape, vocab_size: int, micro_batch_size: int, count: int, seed: int, device: str) -> list[dict]:
    """Random tokens; the cost of a step does not depend on the token values."""
    gen = torch.Generator().manual_seed(seed)
    positions = torch.arange(shape.seq_length).expand(micro_batch_size, -1)
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, vocab_size, (micro_batch_size, shape.seq_length + 1), generator=gen)
        batch = {
            "tokens": tokens[:, :-1],
            "labels": tokens[:, 1:],
            "loss_mask": torch.ones(micro_batch_size, shape.seq_length),
            "position_ids": positions,
        }
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def loss_functions(cfg: OverheadConfig) -> dict:
    from megatron_reweight import ReweightConfig, SampleReweighter, TemperatureSchedule

    funcs = {}
    for variant in cfg.variants:
        if variant in (PLAIN, PLAIN_REPEAT):
            funcs[variant] = plain_loss_func
        else:
            reweighter = SampleReweighter.from_parallel_state(ReweightConfig(variant, TemperatureSchedule(r=0.4)))
            funcs[variant] = reweighter.loss_func
    return funcs


def time_training_steps(
    cfg: OverheadConfig, model, optimizer, shape, micro_batch_size, num_microbatches, funcs
) -> dict:
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    forward_backward = get_forward_backward_func()
    batches = make_batches(
        shape, cfg.vocab_size, micro_batch_size, num_microbatches, cfg.seed + dist.get_rank(), cfg.device
    )

    def forward_step(loss_func, data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(loss_func, batch["loss_mask"])

    def train_step(loss_func) -> float:
        synchronize(cfg)
        dist.barrier()
        start = time.perf_counter()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(
            forward_step_func=partial(forward_step, loss_func),
            data_iterator=iter(batches),
            model=[model],
            num_microbatches=num_microbatches,
            seq_length=shape.seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=False,
        )
        optimizer.step()
        synchronize(cfg)
        return time.perf_counter() - start

    order_rng = np.random.default_rng(cfg.seed)  # same seed on every rank: same order
    times = {variant: [] for variant in cfg.variants}
    for _ in range(cfg.rounds):
        for index in order_rng.permutation(len(cfg.variants)):
            variant = cfg.variants[index]
            times[variant].append(train_step(funcs[variant]))
    # A step takes as long as its slowest rank.
    stacked = torch.tensor([times[v] for v in cfg.variants], dtype=torch.float64, device=cfg.device)
    dist.all_reduce(stacked, op=dist.ReduceOp.MAX)
    return {v: stacked[i, cfg.warmup_rounds :].tolist() for i, v in enumerate(cfg.variants)}


def time_loss_functions(cfg: OverheadConfig, shape, micro_batch_size, funcs) -> dict:
    """Forward + backward through the loss function alone, interleaved like the steps."""
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(cfg.seed + 1 + dist.get_rank())
    token_losses = (
        (torch.rand(micro_batch_size, shape.seq_length, generator=gen, dtype=torch.float32) * 8).to(cfg.device)
    ).requires_grad_()
    loss_mask = torch.ones(micro_batch_size, shape.seq_length, device=cfg.device)
    order_rng = np.random.default_rng(cfg.seed + 1)
    times = {variant: [] for variant in cfg.variants}
    chunk = 20  # calls per timing: long enough for the clock, short enough to interleave finely
    for _ in range(cfg.loss_func_repeats // chunk):
        for index in order_rng.permutation(len(cfg.variants)):
            variant = cfg.variants[index]
            synchronize(cfg)
            dist.barrier()
            start = time.perf_counter()
            for _ in range(chunk):
                loss, _, _ = funcs[variant](loss_mask, token_losses)
                loss.backward()
            synchronize(cfg)
            times[variant].append((time.perf_counter() - start) / chunk)
    stacked = torch.tensor([times[v] for v in cfg.variants], dtype=torch.float64, device=cfg.device)
    dist.all_reduce(stacked, op=dist.ReduceOp.MAX)
    return {v: stacked[i].tolist() for i, v in enumerate(cfg.variants)}


def worker(cfg: OverheadConfig, out: Path) -> None:
    import torch.distributed as dist

    from megatron_reweight.model import transformer_engine_available

    torch.set_num_threads(cfg.threads_per_rank)
    model, optimizer, shape, micro_batch_size, num_microbatches = build_training(cfg)
    funcs = loss_functions(cfg)
    step_times = time_training_steps(cfg, model, optimizer, shape, micro_batch_size, num_microbatches, funcs)
    loss_func_times = time_loss_functions(cfg, shape, micro_batch_size, funcs)
    if dist.get_rank() == 0:
        parameters = sum(p.numel() for p in model.parameters())
        out.write_text(
            json.dumps(
                {
                    "data_parallel_size": dist.get_world_size(),
                    "micro_batch_size": micro_batch_size,
                    "num_microbatches": num_microbatches,
                    "seq_length": shape.seq_length,
                    "model_shape": {**asdict(shape), "vocab_size": cfg.vocab_size},
                    "parameters": parameters,
                    "device": cfg.device,
                    "transformer_engine": cfg.device == "cuda" and transformer_engine_available(),  # as build_training
                    "step_times_s": step_times,
                    "loss_func_times_s": loss_func_times,
                }
            )
        )
    dist.destroy_process_group()


# --- parent: launch, summarise, analyse -----------------------------------------------------


def launch(cfg: OverheadConfig, dp_size: int, out: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    env["OMP_NUM_THREADS"] = str(cfg.threads_per_rank)
    command = local_torchrun(
        dp_size,
        ["-m", "benchmarks.overhead", "--worker", "--worker-out", str(out), "--worker-config", json.dumps(asdict(cfg))],
    )
    subprocess.run(command, cwd=REPO_ROOT, env=env, check=True)


def ratio_statistics(values: np.ndarray, baseline: np.ndarray, rng: np.random.Generator, samples: int) -> dict:
    ratios = values / baseline
    medians = np.median(rng.choice(ratios, size=(samples, ratios.size), replace=True), axis=1)
    return {
        "median": float(np.median(ratios)),
        "iqr": [float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))],
        "median_ci95": [float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))],
    }


def summarise(cfg: OverheadConfig, raw: dict) -> dict:
    rng = np.random.default_rng(cfg.seed)
    steps = {v: np.array(t) for v, t in raw["step_times_s"].items()}
    loss_funcs = {v: np.array(t) for v, t in raw["loss_func_times_s"].items()}
    plain_step = float(np.median(steps[PLAIN]))
    plain_loss_func = float(np.median(loss_funcs[PLAIN]))
    variants = {}
    for variant in cfg.variants:
        entry = {
            "step_ms_median": 1e3 * float(np.median(steps[variant])),
            "step_ms_iqr": [1e3 * float(np.percentile(steps[variant], q)) for q in (25, 75)],
            "loss_func_us_median": 1e6 * float(np.median(loss_funcs[variant])),
        }
        if variant != PLAIN:
            entry["step_ratio_to_plain"] = ratio_statistics(steps[variant], steps[PLAIN], rng, cfg.bootstrap_samples)
            if variant not in ("uniform", PLAIN_REPEAT):
                entry["step_ratio_to_plugin_uniform"] = ratio_statistics(
                    steps[variant], steps["uniform"], rng, cfg.bootstrap_samples
                )
            # Loss-function time added per microbatch, times microbatches, over the plain step.
            added = (np.median(loss_funcs[variant]) - plain_loss_func) * raw["num_microbatches"]
            entry["loss_func_added_fraction_of_step"] = float(added / plain_step)
        variants[variant] = entry
    return {
        key: raw[key]
        for key in (
            "data_parallel_size",
            "micro_batch_size",
            "num_microbatches",
            "seq_length",
            "model_shape",
            "parameters",
        )
    } | {"rounds_kept": len(steps[PLAIN]), "variants": variants}


_LLAMA_7B = preset_config("llama-7b")


@dataclass(frozen=True)
class ClusterLayout:
    """Paper 1's 7B run as a Megatron layout: the llama-7b preset's shape and batch (Tables 6 and 7)
    on the launch script's GPUs."""

    nodes: int = 8
    gpus_per_node: int = 8
    tensor_parallel: int = 2
    pipeline_parallel: int = 1
    context_parallel: int = 1
    use_distributed_optimizer: bool = True
    global_batch_size: int = _LLAMA_7B.optim.global_batch_size
    micro_batch_size: int = _LLAMA_7B.optim.micro_batch_size
    seq_length: int = _LLAMA_7B.model.seq_length
    num_layers: int = _LLAMA_7B.model.num_layers
    hidden_size: int = _LLAMA_7B.model.hidden_size
    ffn_hidden_size: int = _LLAMA_7B.model.ffn_hidden_size
    vocab_size: int = 32000  # Llama-2's tokenizer
    loss_bytes: int = 4  # per-sample losses are gathered in fp32
    grad_bytes: int = 4  # the trainer reduces gradients in fp32 under --bf16 (grad_reduce_in_fp32)
    param_bytes: int = 2  # bf16 parameters, all-gathered by the distributed optimizer


def analytic_gather_cost(layout: ClusterLayout) -> dict:
    """Bytes the loss all-gather moves per rank against the data-parallel gradient traffic."""
    world = layout.nodes * layout.gpus_per_node
    model_parallel = layout.tensor_parallel * layout.pipeline_parallel * layout.context_parallel
    dp = world // model_parallel
    microbatches = layout.global_batch_size // (dp * layout.micro_batch_size)
    # Llama: attention 4 h^2 (no GQA at 7B), SwiGLU 3 h f, two norms; untied input/output embeddings.
    per_layer = 4 * layout.hidden_size**2 + 3 * layout.hidden_size * layout.ffn_hidden_size + 2 * layout.hidden_size
    parameters = layout.num_layers * per_layer + 2 * layout.vocab_size * layout.hidden_size + layout.hidden_size
    elements_per_rank = parameters / (layout.tensor_parallel * layout.pipeline_parallel)
    # Ring collectives, bytes each rank receives: all-gather or reduce-scatter of n bytes -> (dp-1)/dp n,
    # all-reduce of n -> 2 (dp-1)/dp n.
    ring = (dp - 1) / dp
    gathered_per_microbatch = dp * layout.micro_batch_size * layout.loss_bytes
    gather_per_step = microbatches * ring * gathered_per_microbatch
    all_reduce = 2 * ring * elements_per_rank * layout.grad_bytes
    reduce_scatter = ring * elements_per_rank * layout.grad_bytes
    param_all_gather = ring * elements_per_rank * layout.param_bytes
    dp_traffic = reduce_scatter + param_all_gather if layout.use_distributed_optimizer else all_reduce
    return {
        "layout": asdict(layout),
        "data_parallel_size": dp,
        "microbatches_per_step": microbatches,
        "parameters": int(parameters),
        "gradient_elements_per_rank": int(elements_per_rank),
        "gathered_tensor_bytes_per_microbatch": gathered_per_microbatch,
        "gather_bytes_received_per_rank_per_step": gather_per_step,
        "grad_all_reduce_bytes_per_rank_per_step": all_reduce,
        "grad_reduce_scatter_bytes_per_rank_per_step": reduce_scatter,
        "param_all_gather_bytes_per_rank_per_step": param_all_gather,
        "dp_traffic_bytes_per_rank_per_step": dp_traffic,
        "gather_to_all_reduce_ratio": gather_per_step / all_reduce,
        "gather_to_reduce_scatter_ratio": gather_per_step / reduce_scatter,
        "gather_to_dp_traffic_ratio": gather_per_step / dp_traffic,
        "gather_collectives_per_step": microbatches,
        "cp_all_reduce_per_microbatch": "none at CP=1; at CP>1 one all-reduce of 3 x micro-batch fp32 values over the CP group",
    }


def layout_from_sbatch(path: Path) -> ClusterLayout:
    """Read nodes / GPUs / TP / PP / CP / batch sizes from the 7B launch script if it is there."""
    layout = ClusterLayout()
    if not path.exists():
        return layout
    import re

    text = path.read_text()
    fields = {
        "nodes": r"#SBATCH\s+(?:--nodes|-N)[=\s](\d+)",
        "gpus_per_node": r"#SBATCH\s+--(?:gpus-per-node|gres=gpu:)[=\s]?(?:\w+:)?(\d+)",
        "tensor_parallel": r"--tensor-model-parallel-size[=\s]+(\d+)",
        "pipeline_parallel": r"--pipeline-model-parallel-size[=\s]+(\d+)",
        "context_parallel": r"--context-parallel-size[=\s]+(\d+)",
        "global_batch_size": r"--global-batch-size[=\s]+(\d+)",
        "micro_batch_size": r"--micro-batch-size[=\s]+(\d+)",
    }
    # The launch script's global and micro-batch sizes come from its --preset unless given as flags.
    values = {}
    for name, pattern in fields.items():
        match = re.search(pattern, text)
        if match:
            values[name] = int(match.group(1))
    values["use_distributed_optimizer"] = "--use-distributed-optimizer" in text
    return ClusterLayout(**{**asdict(layout), **values})


def markdown_section(report: dict) -> str:
    """The overhead block of docs/results.md, every number from `report`."""
    runs, cfg, machine = report["runs"], report["config"], report["machine"]
    first = runs[0]
    shape = first["model_shape"]
    load = machine["load_average_1min_before_after"]
    lines = [
        (
            f"Command: `{report['command']}` ({report['date']}, {report['runtime_seconds']:.0f} s on a {machine['cpus']}-core CPU, "
            f"{cfg['threads_per_rank']} thread per rank; 1-minute load average {load[0]:.1f} before and {load[1]:.1f} after: "
            f"the machine was shared)."
        ),
        "",
        (
            f"Model: the `{cfg['preset']}` preset's Llama GPTModel ({first['parameters'] / 1e6:.2f}M parameters: {shape['num_layers']} layers, "
            f"hidden {shape['hidden_size']}, vocabulary {shape['vocab_size']}), sequence {first['seq_length']}, micro-batch {first['micro_batch_size']}; "
            f"one step = megatron-core forward-backward over the global batch, DDP gradient reduction, Adam with grad clipping. "
            f"{first['rounds_kept']} interleaved rounds kept after {cfg['warmup_rounds']} warm-up rounds; ratios are paired per round."
        ),
        "",
        "| loss function | "
        + " | ".join(
            f"DP={r['data_parallel_size']} ({r['num_microbatches']} micro-batches): step / plain, median [IQR] (95% CI) | DP={r['data_parallel_size']}: loss_func µs (+% of step)"
            for r in runs
        )
        + " |",
        "|---|" + "---|---|" * len(runs),
    ]
    for variant in cfg["variants"]:
        cells = []
        for run in runs:
            entry = run["variants"][variant]
            if variant == PLAIN:
                cells += [
                    f"{entry['step_ms_median']:.1f} ms per step (baseline)",
                    f"{entry['loss_func_us_median']:.0f}",
                ]
                continue
            ratio = entry["step_ratio_to_plain"]
            cells += [
                f"{ratio['median']:.3f} [{ratio['iqr'][0]:.3f}, {ratio['iqr'][1]:.3f}] ({ratio['median_ci95'][0]:.3f}, {ratio['median_ci95'][1]:.3f})",
                f"{entry['loss_func_us_median']:.0f} ({100 * entry['loss_func_added_fraction_of_step']:+.2f}%)",
            ]
        name = {PLAIN: "plain (pretrain_gpt.py)", PLAIN_REPEAT: "plain again (A/A control)"}.get(
            variant, f"plugin `{variant}`"
        )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for run in runs:
        reweighted = [v for v in cfg["variants"] if v not in (PLAIN, PLAIN_REPEAT)]
        control = run["variants"][PLAIN_REPEAT]["step_ratio_to_plain"]
        medians = [run["variants"][v]["step_ratio_to_plain"]["median"] for v in reweighted]
        uppers = [run["variants"][v]["step_ratio_to_plain"]["median_ci95"][1] for v in reweighted]
        added = [run["variants"][v]["loss_func_added_fraction_of_step"] for v in reweighted]
        lines += [
            "",
            (
                f"DP={run['data_parallel_size']}: median step ratios of the plugin strategies {min(medians):.3f} to {max(medians):.3f} "
                f"(upper ends of their 95% CIs {min(uppers):.3f} to {max(uppers):.3f}); the A/A control reads {control['median']:.3f} "
                f"(95% CI {control['median_ci95'][0]:.3f} to {control['median_ci95'][1]:.3f}, IQR {control['iqr'][0]:.3f} to {control['iqr'][1]:.3f}). "
                f"The loss function alone adds {100 * min(added):.2f}% to {100 * max(added):.2f}% of a plain step "
                f"({'within' if max(added) <= 0.01 else 'more than'} the 1% goal)."
            ),
        ]
    a = report["analytic_7b"]
    layout = a["layout"]
    lines += [
        "",
        (
            f"All-gather traffic at paper 1's 7B scale, analytically ({a['layout_source']}): {layout['nodes']} nodes x {layout['gpus_per_node']} GPUs, "
            f"TP={layout['tensor_parallel']}, PP={layout['pipeline_parallel']}, CP={layout['context_parallel']} -> DP={a['data_parallel_size']}; "
            f"global batch {layout['global_batch_size']} x {layout['seq_length']} tokens, micro-batch {layout['micro_batch_size']} -> "
            f"{a['microbatches_per_step']} micro-batches per step; {a['parameters'] / 1e9:.2f}B parameters (vocabulary {layout['vocab_size']}), "
            f"{a['gradient_elements_per_rank'] / 1e9:.2f}B parameters per rank (after TP); gradients reduced in {layout['grad_bytes']}-byte "
            f"precision, parameters {layout['param_bytes']}-byte; distributed optimizer {'on' if layout['use_distributed_optimizer'] else 'off'}."
        ),
        "",
        "| quantity, per rank | bytes |",
        "|---|---|",
        f"| gathered loss tensor, per micro-batch (DP x micro-batch x {layout['loss_bytes']} B) | {a['gathered_tensor_bytes_per_microbatch']:,} |",
        f"| loss all-gather received, per step (ring) | {a['gather_bytes_received_per_rank_per_step']:,.0f} |",
        f"| gradient all-reduce, per step (ring) | {a['grad_all_reduce_bytes_per_rank_per_step']:,.0f} |",
        f"| gradient reduce-scatter, per step (distributed optimizer) | {a['grad_reduce_scatter_bytes_per_rank_per_step']:,.0f} |",
        f"| parameter all-gather, per step (distributed optimizer) | {a['param_all_gather_bytes_per_rank_per_step']:,.0f} |",
        f"| ratio gather / gradient all-reduce | {a['gather_to_all_reduce_ratio']:.1e} |",
        f"| ratio gather / gradient reduce-scatter | {a['gather_to_reduce_scatter_ratio']:.1e} |",
        f"| ratio gather / this layout's data-parallel traffic | {a['gather_to_dp_traffic_ratio']:.1e} |",
        "",
        (
            f"The bytes are negligible; what the gather does cost is {a['gather_collectives_per_step']} small, latency-bound collectives per step, "
            "each inside the loss function between a micro-batch's forward and backward, which also makes the DP ranks wait for one "
            "another at every micro-batch instead of only at the gradient reduction."
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON (the default also updates docs/results.md)")
    parser.add_argument("--dp-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=OverheadConfig.rounds)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=OverheadConfig.device)
    parser.add_argument("--preset", default=OverheadConfig.preset, help="model shape and batch (a trainer preset)")
    parser.add_argument("--vocab-size", type=int, default=OverheadConfig.vocab_size)
    for name in ("num_layers", "seq_length", "micro_batch_size", "num_microbatches"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, help="default: the preset's")
    parser.add_argument("--variants", nargs="+", default=list(OverheadConfig.variants))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-config", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        values = json.loads(args.worker_config)
        worker(
            OverheadConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}), args.worker_out
        )
        return

    from megatron_reweight.training.config import PRESETS

    if args.preset not in PRESETS:
        parser.error(f"--preset {args.preset}: choose one of {', '.join(PRESETS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU visible")
    if args.rounds <= OverheadConfig.warmup_rounds:
        parser.error(f"--rounds must exceed the {OverheadConfig.warmup_rounds} warm-up rounds it discards")
    if not {PLAIN, PLAIN_REPEAT, "uniform"} <= set(args.variants):
        parser.error(f"--variants must include {PLAIN}, {PLAIN_REPEAT} and uniform (the baselines)")
    cfg = OverheadConfig(
        rounds=args.rounds, device=args.device, preset=args.preset, vocab_size=args.vocab_size,
        num_layers=args.num_layers, seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
        num_microbatches=args.num_microbatches, variants=tuple(args.variants),
    )  # fmt: skip
    start = time.perf_counter()
    load_before = os.getloadavg()  # a shared machine: say how busy it was
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for dp_size in args.dp_sizes:
            out = Path(tmp) / f"dp{dp_size}.json"
            launch(cfg, dp_size, out)
            runs.append(summarise(cfg, json.loads(out.read_text())))
    sbatch = REPO_ROOT / "examples" / "slurm" / "llama7b_fineweb175b.sbatch"
    layout = layout_from_sbatch(sbatch)
    report = {
        "benchmark": "overhead",
        "command": " ".join(["python -m benchmarks.overhead", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if cfg.device == "cuda" else "cpu",
            "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
        },
        "runtime_seconds": round(time.perf_counter() - start, 1),
        "config": asdict(cfg),
        "runs": runs,
        "analytic_7b": analytic_gather_cost(layout)
        | {
            "layout_source": sbatch.relative_to(REPO_ROOT).as_posix()
            if sbatch.exists()
            else "ClusterLayout defaults (paper 1 Tables 6-7; 8 nodes x 8 GPUs, TP=2)"
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    if args.out.resolve() == DEFAULT_OUT:
        write_results_section("overhead", markdown_section(report), "overhead")
    for run in runs:
        plain = run["variants"][PLAIN]
        print(
            f"DP={run['data_parallel_size']}  plain step {plain['step_ms_median']:.1f} ms, plain loss_func {plain['loss_func_us_median']:.0f} us"
            f"  ({run['num_microbatches']} microbatches of {run['micro_batch_size']} x {run['seq_length']})"
        )
        for variant, entry in run["variants"].items():
            if variant == PLAIN:
                continue
            ratio = entry["step_ratio_to_plain"]
            print(
                f"  {variant:11s} step/plain median {ratio['median']:.4f}  IQR [{ratio['iqr'][0]:.4f}, {ratio['iqr'][1]:.4f}]"
                f"  CI95 [{ratio['median_ci95'][0]:.4f}, {ratio['median_ci95'][1]:.4f}]"
                f"  loss_func {entry['loss_func_us_median']:.0f} us ({100 * entry['loss_func_added_fraction_of_step']:+.2f}% of step)"
            )
    analytic = report["analytic_7b"]
    print(
        f"7B (DP={analytic['data_parallel_size']}): gather / DP traffic bytes {analytic['gather_to_dp_traffic_ratio']:.2e}"
    )
    print(f"wrote {args.out} in {report['runtime_seconds']} s")


if __name__ == "__main__":
    main()
