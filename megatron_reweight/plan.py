"""The layout planner: which TP, PP, CP, DP, micro-batch and recomputed layers give a preset the
papers' exact weighting window (the whole global batch) at the least cost on a number of GPUs.

    megatron-reweight-plan --preset llama-7b --gpus 64 --gpu-memory 80

Memory is Megatron-LM's theoretical estimate (megatron/training/theoretical_memory_usage.py,
ported here exactly; tests/integration/test_plan.py checks it against the real function) for the
layout's `pretrain_gpt.py` flags, with two additions Megatron-LM's formula does not make:
- the core attention counts as recomputed (Megatron's "selective" branch) whenever the
  activations are split over TP with sequence parallelism: Transformer Engine's flash attention
  keeps no s x s scores, which is what selective recomputation saves;
- full recomputation of N layers per pipeline stage keeps only those layers' inputs, plus one
  layer's activations while it is recomputed; context parallelism splits the sequence.
A layout fits when the estimate is at most `usable_fraction` of the GPU's memory (the formula
leaves out the CUDA context, NCCL buffers and allocator fragmentation).

The step cost is relative to an ideal step (one forward and backward pass, nothing exposed):
+ recomputation: one more forward pass of the recomputed layers, 1/3 of their share of the FLOPs;
+ the global-batch window's forward-only pass when a step has several micro-batches: 1/3
  (none with one micro-batch per step, where the training pass itself sees the whole batch);
x the pipeline bubble, 1 + (PP - 1) / micro-batches;
x the exposed TP and CP communication inside a node (sequence parallelism's all-gathers and
  reduce-scatters, ring attention's key/value exchange) at NVLINK_BYTES_PER_S against the
  layer's FLOPs at GPU_FLOPS. DP communication is overlapped (--overlap-grad-reduce,
  --overlap-param-gather) and left out.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_reweight.model import ModelConfig

GIB = 1024**3  # Megatron's "MB" are MiB; its estimate is printed here in GiB
# The communication model's machine: NCCL's all-gather/reduce-scatter bus bandwidth over NVLink 4
# (H100/H200 SXM, about 360 GB/s of the 450 GB/s per direction) and a dense bf16 rate that
# Megatron-LM reaches on such GPUs (about 400 TFLOP/s for a 7B GPT).
NVLINK_BYTES_PER_S = 360e9
GPU_FLOPS = 400e12
GPUS_PER_NODE = 8  # TP and CP stay inside a node
# The tokenizer vocabulary of each preset's data: the papers' GPT-2 and Llama-2 tokenizers, and
# the mock data's default for tiny.
VOCAB = {"tiny": 4096, "gpt2-mini": 50257, "gpt2-small": 50257, "gpt2-medium": 50257, "llama-1.4b": 32000,
         "llama-7b": 32000}  # fmt: skip


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    cp: int
    dp: int
    micro_batch: int
    num_microbatches: int
    recompute_layers: int = 0  # per pipeline stage, full recomputation, block method
    sp: bool = True  # sequence parallelism when TP > 1 (the planner's layouts always use it)

    @property
    def sequence_parallel(self) -> bool:
        return self.sp and self.tp > 1

    def flags(self) -> list[str]:
        """pretrain_llama.py's flags for this layout (the distributed optimizer as the sbatch scripts)."""
        flags = ["--tensor-model-parallel-size", str(self.tp), "--pipeline-model-parallel-size", str(self.pp),
                 "--context-parallel-size", str(self.cp), "--micro-batch-size", str(self.micro_batch),
                 "--use-distributed-optimizer"]  # fmt: skip
        if self.sequence_parallel:
            flags.append("--sequence-parallel")
        if self.recompute_layers:
            flags += ["--recompute-granularity", "full", "--recompute-method", "block",
                      "--recompute-num-layers", str(self.recompute_layers)]  # fmt: skip
        return flags


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    window: str  # the weighting window (--reweight-window); the planner's is the papers', global-batch
    weights_and_optimizer: float  # bytes per GPU, the most loaded pipeline stage
    activations: float
    recompute_share: float  # extra fraction of an ideal step
    extra_pass_share: float
    bubble_share: float
    communication_share: float

    @property
    def memory(self) -> float:
        return self.weights_and_optimizer + self.activations

    @property
    def window_is_free(self) -> bool:
        """One micro-batch per step: the training pass sees the whole global batch."""
        return self.layout.num_microbatches == 1

    def _window_note(self) -> str:
        if self.window != "global-batch":
            return f"{self.window} window (not the whole global batch unless one micro-batch per step)"
        if self.window_is_free:
            return "global-batch window free (one micro-batch per step)"
        return "global-batch window through the forward-only pass"

    @property
    def cost(self) -> float:
        """Step time relative to an ideal step."""
        compute = 1 + self.recompute_share + self.extra_pass_share
        return compute * (1 + self.bubble_share) * (1 + self.communication_share)

    def summary(self) -> str:
        parts = [f"recomputation +{self.recompute_share:.0%}", f"forward-only pass +{self.extra_pass_share:.0%}"]
        if self.bubble_share:
            parts.append(f"pipeline bubble +{self.bubble_share:.0%}")
        parts.append(f"TP/CP communication +{self.communication_share:.0%}")
        return (
            f"{_size(self.memory)} per GPU (weights and optimizer {_size(self.weights_and_optimizer)}, "
            f"activations {_size(self.activations)}; Megatron-LM's formula), step cost {self.cost:.2f} x an "
            f"ideal step ({', '.join(parts)}), {self._window_note()}"
        )


def _size(size: float) -> str:
    return f"{size / GIB:.2f} GiB" if size >= GIB / 10 else f"{size / 1024**2:.1f} MiB"


# ------------------------------------------------------------- Megatron-LM's formula (ported)
@dataclass(frozen=True)
class MemoryArgs:
    """The arguments megatron/training/theoretical_memory_usage.py reads, for a dense GPT with
    SwiGLU, RMSNorm and untied embeddings (no MoE, no MTP, no multi-latent attention)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    seq_length: int
    padded_vocab_size: int
    micro_batch_size: int
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    data_parallel_size: int
    use_distributed_optimizer: bool
    sequence_parallel: bool
    recompute_granularity: str | None


def weight_and_optimizer_memory(a: MemoryArgs) -> float:
    """compute_weight_and_optimizer_memory, in bytes."""
    kv_channels = a.hidden_size // a.num_attention_heads
    query_projection_ratio = kv_channels * a.num_attention_heads / a.hidden_size
    self_attention = 2 * a.hidden_size * a.hidden_size * (
        (1 + a.num_query_groups / a.num_attention_heads) * query_projection_ratio
    )
    norm_size = 1  # RMSNorm
    layer = 2 * a.hidden_size * (a.ffn_hidden_size * 3 / 2 + norm_size) + self_attention
    embedding = a.hidden_size * a.padded_vocab_size
    block = layer * a.num_layers + norm_size * a.hidden_size
    most_loaded_shard = (block / a.pipeline_model_parallel_size + embedding) / a.tensor_model_parallel_size
    if a.pipeline_model_parallel_size == 1:
        most_loaded_shard += embedding / a.tensor_model_parallel_size  # the untied output layer
    bytes_per_parameter = 6 + 12 / a.data_parallel_size if a.use_distributed_optimizer else 18
    return most_loaded_shard * bytes_per_parameter


def _pipeline_factor(a: MemoryArgs, num_microbatches: int | None) -> float:
    """The non-interleaved schedule's in-flight micro-batches, as a fraction of PP."""
    if a.pipeline_model_parallel_size > 1 and num_microbatches is not None:
        return min(1, num_microbatches / a.pipeline_model_parallel_size)
    return 1


def _embedding_activations(a: MemoryArgs) -> float:
    s, b, p = a.seq_length, a.micro_batch_size, a.pipeline_model_parallel_size
    return 8 * s * b * p + s * b * a.hidden_size * p


def layer_activation_memory(a: MemoryArgs) -> float:
    """One transformer layer's activations per micro-batch and GPU, in bytes, as the branch of
    Megatron's estimate that `a` selects counts them (the 5% overhead of the branch without SP included)."""
    sbh = a.seq_length * a.micro_batch_size * a.hidden_size
    if a.sequence_parallel and a.recompute_granularity == "selective":
        return sbh * (18 + 4 * a.ffn_hidden_size / a.hidden_size) / a.tensor_model_parallel_size
    return sbh * (10 + 24 / a.tensor_model_parallel_size) * 1.05


def activation_memory(a: MemoryArgs, num_microbatches: int | None) -> float:
    """compute_activation_memory (sequence parallelism with selective recomputation) or
    compute_activation_memory_without_sp, as report_theoretical_memory chooses, in bytes."""
    s, b, h, t = a.seq_length, a.micro_batch_size, a.hidden_size, a.tensor_model_parallel_size
    with_sp = a.sequence_parallel and a.recompute_granularity == "selective"
    per_layer = s * b * h * ((18 + 4 * a.ffn_hidden_size / h) if with_sp else (10 + 24 / t))
    memory = (per_layer * a.num_layers + _embedding_activations(a)) * _pipeline_factor(a, num_microbatches)
    last_stage = a.pipeline_model_parallel_size == 1  # the output layer and loss are on this stage too
    if with_sp:
        return (memory + (s * b * h * 4 * (1 + a.padded_vocab_size / h) if last_stage else 0)) / t
    return (memory + ((s * b * a.padded_vocab_size / t + s * b * h) * 2 if last_stage else 0)) * 1.05


# ---------------------------------------------------------------------------- the planner
def memory_args(shape: ModelConfig, vocab: int, layout: Layout) -> MemoryArgs:
    from megatron_reweight.training.data import padded_vocab_size

    return MemoryArgs(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size, ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_attention_heads, num_query_groups=shape.num_query_groups,
        seq_length=shape.seq_length // layout.cp,  # each CP rank holds s / CP tokens
        padded_vocab_size=padded_vocab_size(vocab, shape.make_vocab_size_divisible_by, layout.tp),
        micro_batch_size=layout.micro_batch, tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp, data_parallel_size=layout.dp, use_distributed_optimizer=True,
        sequence_parallel=layout.sequence_parallel,
        recompute_granularity="selective" if layout.sequence_parallel else None,  # flash attention: no s x s scores
    )  # fmt: skip


def _layer_flops_per_token(shape: ModelConfig) -> float:
    """Forward FLOPs of one transformer layer per token: the GEMMs, and causal attention (half of 4 s h)."""
    h, heads = shape.hidden_size, shape.num_attention_heads
    attention_weights = 2 * h * h * (1 + shape.num_query_groups / heads)
    mlp_weights = 3 * h * shape.ffn_hidden_size
    return 2 * (attention_weights + mlp_weights) + 2 * shape.seq_length * h


def estimate(shape: ModelConfig, vocab: int, layout: Layout, window: str = "global-batch") -> Estimate:
    a = memory_args(shape, vocab, layout)
    activations = activation_memory(a, layout.num_microbatches)
    n = layout.recompute_layers
    if n:
        # A recomputed layer keeps its input (split over TP with sequence parallelism), in every
        # in-flight micro-batch; the layer being recomputed needs its activations once.
        layer = layer_activation_memory(a)
        kept_input = 2 * a.seq_length * a.micro_batch_size * a.hidden_size / (a.tensor_model_parallel_size if a.sequence_parallel else 1)
        in_flight = min(layout.pp, layout.num_microbatches)
        activations += layer - n * in_flight * (layer - kept_input)

    layer_flops = _layer_flops_per_token(shape)
    model_flops = shape.num_layers * layer_flops + 2 * shape.hidden_size * vocab
    recomputed_layers = n * layout.pp
    recompute_share = recomputed_layers * layer_flops / model_flops / 3
    extra_pass_share = 1 / 3 if window == "global-batch" and layout.num_microbatches > 1 else 0.0
    bubble_share = (layout.pp - 1) / layout.num_microbatches
    # Per layer and micro-batch, forward and backward: sequence parallelism's 4 + 4 collectives of
    # s x b x h bf16 (each GPU sends (t - 1) / t of them); ring attention sends keys and values
    # (cp - 1) times forward and twice that backward. Against the layer's 3 x forward FLOPs per GPU.
    tokens = shape.seq_length * layout.micro_batch
    compute_s = 3 * layer_flops * tokens / (layout.tp * layout.cp) / GPU_FLOPS
    tp_bytes = 8 * 2 * tokens / layout.cp * shape.hidden_size * (layout.tp - 1) / layout.tp
    kv_width = 2 * shape.hidden_size * shape.num_query_groups / shape.num_attention_heads
    cp_bytes = 3 * (layout.cp - 1) * 2 * tokens / layout.cp * kv_width / layout.tp
    communication_share = (tp_bytes + cp_bytes) / NVLINK_BYTES_PER_S / compute_s
    return Estimate(
        layout, window, weight_and_optimizer_memory(a), activations, recompute_share, extra_pass_share, bubble_share,
        communication_share,
    )  # fmt: skip


def run_layout(config, dp: int) -> Layout:
    """The layout of a pretrain_llama.py run (a TrainConfig) on `dp` data-parallel ranks; uniform
    full recomputation counts as all layers recomputed, selective as none."""
    p, o = config.parallel, config.optim
    recomputed = 0
    if p.recompute_granularity == "full":
        per_stage = config.model.num_layers // p.pipeline_model_parallel_size
        recomputed = p.recompute_num_layers if p.recompute_method == "block" else per_stage
    return Layout(
        p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size, dp,
        o.micro_batch_size, o.global_batch_size // (o.micro_batch_size * dp), recomputed, p.sequence_parallel,
    )  # fmt: skip


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(shape: ModelConfig, global_batch: int, gpus: int):
    """Every layout Megatron accepts (and the trainer checks) for this shape, batch and GPU count."""
    for tp in _divisors(GPUS_PER_NODE):
        if shape.num_attention_heads % tp or shape.num_query_groups % tp or shape.ffn_hidden_size % tp:
            continue
        for cp in _divisors(GPUS_PER_NODE // tp):
            if cp > 1 and shape.seq_length % (2 * cp):
                continue
            if tp > 1 and (shape.seq_length // cp) % tp:
                continue
            for pp in _divisors(shape.num_layers):
                if gpus % (tp * cp * pp):
                    continue
                dp = gpus // (tp * cp * pp)
                if global_batch % dp:
                    continue
                for micro_batch in _divisors(global_batch // dp):
                    yield Layout(tp, pp, cp, dp, micro_batch, global_batch // (dp * micro_batch))


def fitting(shape: ModelConfig, vocab: int, layout: Layout, budget: float) -> Estimate | None:
    """The layout with the fewest recomputed layers per stage that fits the budget, if any."""
    for n in range(shape.num_layers // layout.pp + 1):
        found = estimate(shape, vocab, Layout(**{**layout.__dict__, "recompute_layers": n}))
        if found.memory <= budget:
            return found
    return None


def plan(
    shape: ModelConfig, vocab: int, global_batch: int, gpus: int, gpu_memory_gib: float, usable_fraction: float = 0.85
) -> list[Estimate]:
    """The feasible layouts, cheapest first (ties: fewer model-parallel GPUs, then less memory)."""
    budget = gpu_memory_gib * GIB * usable_fraction
    found = [e for layout in layouts(shape, global_batch, gpus) if (e := fitting(shape, vocab, layout, budget))]
    return sorted(found, key=lambda e: (round(e.cost, 6), e.layout.tp * e.layout.pp * e.layout.cp, e.memory))


def table(estimates: list[Estimate], limit: int | None = None) -> str:
    """A Markdown table of the layouts, with each cost relative to the cheapest."""
    rows = [
        "| TP | PP | CP | DP | micro-batch | micro-batches | recomputed layers | weights+optimizer GiB | "
        "activations GiB | total GiB | window | cost (x cheapest) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cheapest = estimates[0].cost if estimates else 1.0
    for e in estimates[:limit]:
        lay = e.layout
        window = "free" if e.window_is_free else "forward-only pass"
        rows.append(
            f"| {lay.tp}{' +SP' if lay.sequence_parallel else ''} | {lay.pp} | {lay.cp} | {lay.dp} | {lay.micro_batch} | "
            f"{lay.num_microbatches} | {lay.recompute_layers} | {e.weights_and_optimizer / GIB:.1f} | "
            f"{e.activations / GIB:.1f} | {e.memory / GIB:.1f} | {window} | {e.cost / cheapest:.3f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    # megatron-core's notices that Transformer Engine and apex are absent say nothing to a planner.
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed", category=UserWarning)
    from megatron_reweight.training.config import PRESETS, preset_config

    parser = argparse.ArgumentParser(
        prog="megatron-reweight-plan",
        description="Feasible layouts of a preset on a number of GPUs, with Megatron-LM's memory estimate and the "
        "step cost of the papers' exact weighting window (the whole global batch); the cheapest is recommended.",
    )
    parser.add_argument(
        "--preset", default="llama-7b", choices=sorted(PRESETS), help="model shape, sequence length and global batch"
    )
    parser.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    parser.add_argument("--gpu-memory", type=float, required=True, help="memory per GPU in GiB (H100: 80, H200: 141)")
    parser.add_argument("--seq-length", type=int, help="default: the preset's")
    parser.add_argument("--global-batch-size", type=int, help="default: the preset's")
    parser.add_argument("--vocab-size", type=int, help="tokenizer vocabulary (default: the preset's data's)")
    parser.add_argument(
        "--usable-fraction", type=float, default=0.85,
        help="fraction of the GPU memory the estimate may fill (default %(default)s)",
    )  # fmt: skip
    parser.add_argument("--top", type=int, default=12, help="layouts listed (default %(default)s)")
    args = parser.parse_args(argv)
    config = preset_config(args.preset)
    if args.gpus < 1 or args.gpu_memory <= 0 or not 0 < args.usable_fraction <= 1:
        parser.error("--gpus must be >= 1, --gpu-memory > 0 and --usable-fraction in (0, 1]")
    shape = config.model
    if args.seq_length:
        shape.seq_length = args.seq_length
    global_batch = args.global_batch_size or config.optim.global_batch_size
    estimates = plan(shape, args.vocab_size or VOCAB[args.preset], global_batch, args.gpus, args.gpu_memory, args.usable_fraction)
    print(
        f"{args.preset}: sequence {shape.seq_length}, global batch {global_batch}, {args.gpus} GPUs of "
        f"{args.gpu_memory:g} GiB ({args.usable_fraction:.0%} usable)"
    )
    if not estimates:
        print("no layout fits: more GPUs, GPUs with more memory, or a shorter sequence", file=sys.stderr)
        return 1
    print(table(estimates, args.top))
    best = estimates[0]
    print(f"\nrecommended: {' '.join(best.layout.flags())}")
    print(f"  {best.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
