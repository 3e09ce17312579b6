"""Typed configuration of a pretraining run, and the model presets.

A run is described by one `TrainConfig`, made of one dataclass per concern. The
presets carry the papers' model shapes (dynamic loss-based reweighting, Appendix A.2,
Tables 6 and 7) as Llama-architecture models, with each table's training defaults;
`arguments.py` turns the command line into a `TrainConfig`, any field overridable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megatron_reweight.loss import ReweightConfig


@dataclass(frozen=True)
class Preset:
    """A model shape with its training defaults (Table 6: shape, Table 7: schedule)."""

    # model (Table 6)
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    seq_length: int
    # training (Table 7). global_batch_size is the table's "minibatch size", in sequences.
    global_batch_size: int
    micro_batch_size: int
    lr: float
    min_lr: float
    lr_warmup_iters: int
    train_iters: int
    reweight_r: float
    reweight_r_warmup_steps: int
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    eval_interval: int = 1000
    eval_iters: int = 10
    log_interval: int = 10
    description: str = ""


# Table 6 gives the embedding width of GPT2-small and GPT2-medium as 786: a typo for 768
# (786 is not divisible by 16 or 24 heads; 768 is GPT-2's width and matches the parameter
# counts). The GPT-2 rows become Llama-architecture models here (RMSNorm, SwiGLU, RoPE,
# untied embeddings, no bias). Their "hidden dimension" 3072 is used as the SwiGLU FFN
# width. The GPT-2 runs used Hugging Face's Trainer, hence Adam betas (0.9, 0.999).
# Table 6's "hidden dimension" of the Llama rows repeats the embedding width; the FFN
# widths are Llama-2-7B's 11008 and, for 1.4B, 5632 (the 2.75x SwiGLU width of
# TinyLlama-style 2048-wide models), which gives about 1.4B parameters with a 32k vocab.
# The paper holds r at 100 for "a specific number of warmup steps" without the number;
# the presets use the learning-rate warm-up length for it.
PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        num_layers=4, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4, num_query_groups=2,
        seq_length=128, global_batch_size=16, micro_batch_size=4, lr=2e-3, min_lr=2e-4,
        lr_warmup_iters=10, train_iters=200, reweight_r=0.4, reweight_r_warmup_steps=10,
        eval_interval=50, eval_iters=2, log_interval=10,
        description="CPU-sized model for the demo run, tests and CI",
    ),
    "gpt2-mini": Preset(
        num_layers=12, hidden_size=768, ffn_hidden_size=3072, num_attention_heads=12, num_query_groups=12,
        seq_length=512, global_batch_size=32, micro_batch_size=4, lr=5e-4, min_lr=1e-4,
        lr_warmup_iters=500, train_iters=20_000, reweight_r=0.4, reweight_r_warmup_steps=500,
        adam_beta2=0.999, eval_interval=2000, description="Table 6 GPT2-mini (124M) as a Llama model",
    ),
    "gpt2-small": Preset(
        num_layers=24, hidden_size=768, ffn_hidden_size=3072, num_attention_heads=16, num_query_groups=16,
        seq_length=512, global_batch_size=48, micro_batch_size=2, lr=5e-4, min_lr=1e-4,
        lr_warmup_iters=500, train_iters=20_000, reweight_r=0.4, reweight_r_warmup_steps=500,
        adam_beta2=0.999, eval_interval=2000, description="Table 6 GPT2-small (210M) as a Llama model",
    ),
    "gpt2-medium": Preset(
        num_layers=36, hidden_size=768, ffn_hidden_size=3072, num_attention_heads=24, num_query_groups=24,
        seq_length=512, global_batch_size=48, micro_batch_size=2, lr=5e-4, min_lr=1e-4,
        lr_warmup_iters=500, train_iters=20_000, reweight_r=0.4, reweight_r_warmup_steps=500,
        adam_beta2=0.999, eval_interval=2000, description="Table 6 GPT2-medium (300M) as a Llama model",
    ),
    "llama-1.4b": Preset(
        num_layers=24, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16, num_query_groups=16,
        seq_length=8192, global_batch_size=128, micro_batch_size=1, lr=3e-4, min_lr=3e-5,
        lr_warmup_iters=2000, train_iters=100_000, reweight_r=1.0, reweight_r_warmup_steps=2000,
        eval_interval=5000, description="Table 6 Llama 1.4B",
    ),
    "llama-7b": Preset(
        num_layers=32, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32, num_query_groups=32,
        seq_length=8192, global_batch_size=128, micro_batch_size=1, lr=3e-4, min_lr=3e-5,
        lr_warmup_iters=2000, train_iters=170_000, reweight_r=2.0, reweight_r_warmup_steps=2000,
        eval_interval=5000, description="Table 6 Llama 7B (Llama-2-7B shape, sequence length 8192)",
    ),
}  # fmt: skip


@dataclass
class ModelConfig:
    preset: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    seq_length: int
    max_position_embeddings: int
    rotary_base: int = 10000
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    distributed_timeout_minutes: int = 10


@dataclass
class OptimConfig:
    micro_batch_size: int
    global_batch_size: int
    train_iters: int
    lr: float
    min_lr: float
    lr_warmup_iters: int
    lr_decay_iters: int
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    seed: int = 1234


@dataclass
class DataConfig:
    # Megatron blend: prefixes with optional weights; None when mock_data is set.
    data_prefixes: list[str] | None
    data_weights: list[float] | None
    mock_data: bool = False
    split: str = "969,30,1"
    tokenizer_model: Path | None = None
    vocab_size: int | None = None  # set from the tokenizer (or --vocab-size with --mock-data)
    eod_id: int | None = None
    data_cache_path: Path | None = None
    num_workers: int = 0
    domains: list[str] = field(default_factory=list)  # names of the blend's prefixes


@dataclass
class EvalConfig:
    eval_interval: int
    eval_iters: int


@dataclass
class CheckpointConfig:
    save: Path | None = None
    load: Path | None = None
    save_interval: int | None = None
    exit_duration_in_mins: float | None = None
    exit_interval: int | None = None
    exit_signal_handler: bool = True
    exit_signal: str = "SIGTERM"
    fully_reshardable_optimizer: bool = False
    load_optimizer: bool = True
    load_rng: bool = True


@dataclass
class LoggingConfig:
    log_interval: int
    tensorboard_dir: Path | None = None
    wandb_project: str | None = None
    wandb_exp_name: str | None = None
    metrics_file: Path | None = None


@dataclass
class DeviceConfig:
    device: str  # "cpu" or "cuda" (resolved from "auto")
    bf16: bool
    transformer_impl: str  # "transformer_engine" or "local"


@dataclass
class TrainConfig:
    model: ModelConfig
    parallel: ParallelConfig
    optim: OptimConfig
    data: DataConfig
    eval: EvalConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    device: DeviceConfig
    reweight: ReweightConfig

    def to_dict(self) -> dict:
        """A JSON-friendly summary, stored in checkpoints and metrics files."""
        from dataclasses import fields, is_dataclass

        def plain(value):
            if is_dataclass(value):
                return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            if isinstance(value, Path):
                return str(value)
            return value

        return plain(self)
