"""The configuration of a pretraining run: every setting declared once, and the presets.

A run is one `TrainConfig`, made of one dataclass per concern. Each field is a setting
(`megatron_reweight.settings.setting`): its default, type, help and check are declared here
(the model's in `model.ModelConfig`, the reweighting's in `loss.ReweightConfig` and
`temperature.TemperatureSchedule`), and `arguments.py` derives the command line from them.
Flag names are Megatron-LM's. The declared defaults are the `tiny` preset's CPU-sized demo run;
a preset is a dict of overrides of them, keyed by flag name, below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megatron_reweight.loss import ReweightConfig
from megatron_reweight.model import ModelConfig
from megatron_reweight.settings import build, non_negative, positive, setting, to_dict


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = setting(1, "tensor-parallel size (TP)", check=positive)
    pipeline_model_parallel_size: int = setting(1, "pipeline-parallel size (PP)", check=positive)
    context_parallel_size: int = setting(1, "context-parallel size (CP)", check=positive)
    sequence_parallel: bool = setting(False, "sequence parallelism within TP (needs Transformer Engine)")
    use_distributed_optimizer: bool = setting(False, "shard the optimizer state over DP (ZeRO-1)")
    overlap_grad_reduce: bool = setting(False, "overlap the gradient reduction with the backward pass")
    overlap_param_gather: bool = setting(False, "overlap the parameter all-gather with the forward pass")
    recompute_granularity: str | None = setting(
        None, "activation recomputation: full (whole layers, with --recompute-method) or selective (core "
        "attention only); default none", choices=("full", "selective"),
    )  # fmt: skip
    recompute_method: str | None = setting(
        None, "with full recomputation: block (the first --recompute-num-layers layers of each pipeline stage) or "
        "uniform (every layer, in groups of --recompute-num-layers)", choices=("block", "uniform"),
    )  # fmt: skip
    recompute_num_layers: int | None = setting(
        None, "layers recomputed per pipeline stage (block) or per group (uniform)", check=positive
    )
    distributed_timeout_minutes: int = setting(10, "timeout of collectives", check=positive)


@dataclass
class OptimConfig:
    micro_batch_size: int = setting(4, "sequences per micro-batch and DP rank", check=positive)
    global_batch_size: int = setting(16, "sequences per optimizer step", check=positive)
    train_iters: int = setting(200, "optimizer steps", check=positive)
    lr: float = setting(2e-3, "peak learning rate", check=positive)
    min_lr: float = setting(2e-4, "learning rate at the end of the decay", check=non_negative)
    lr_warmup_iters: int = setting(
        10, "linear warm-up steps (a preset's is cut to --train-iters - 1)", check=non_negative
    )
    lr_decay_iters: int | None = setting(None, "default: --train-iters", check=positive)
    lr_decay_style: str = setting("cosine", "learning-rate decay", choices=("cosine", "linear", "constant"))
    weight_decay: float = setting(0.01, "AdamW weight decay", check=non_negative)
    clip_grad: float = setting(1.0, "gradient-norm clipping (0: off)", check=non_negative)
    adam_beta1: float = setting(0.9, "Adam beta1")
    adam_beta2: float = setting(0.95, "Adam beta2")
    adam_eps: float = setting(1e-8, "Adam epsilon", check=positive)
    seed: int = setting(1234, "random seed (model init, data order)")
    calculate_per_token_loss: bool = setting(
        False, "Megatron's per-token loss mode: gradients divided by the token count (the same weighted gradient)"
    )
    override_opt_param_scheduler: bool = setting(
        False, "on resume, follow this run's learning-rate schedule settings instead of refusing a change"
    )
    use_checkpoint_opt_param_scheduler: bool = setting(
        False, "on resume, keep the checkpoint's learning-rate schedule settings instead of refusing a change"
    )
    check_for_nan_in_loss_and_grad: bool = setting(
        True, "stop at a NaN/Inf loss or gradient, before that step's update and without saving it"
    )
    check_for_spiky_loss: bool = setting(
        False, "flag a loss 10x the largest of the first 100 micro-batches (a warning; the step is not saved)"
    )


@dataclass
class DataConfig:
    data_path: list[str] | None = setting(
        None, "Megatron blend: [W1] PREFIX1 [W2 PREFIX2 ...]; default: the offline demo corpus"
    )
    mock_data: bool = setting(False, "megatron-core's MockGPTDataset")
    split: str = setting("969,30,1", "train,valid,test document split of every prefix")
    tokenizer_model: Path | None = setting(None, "Hugging Face tokenizer.json the data was made with")
    vocab_size: int | None = setting(None, "with --mock-data and no tokenizer; default: 4096", check=positive)
    data_cache_path: Path | None = setting(
        None, "where megatron-core caches the dataset indices; default: SAVE/data-cache (the demo corpus: its own)"
    )
    num_workers: int | None = setting(None, "data-loader workers; default: 2 on CUDA, 0 on CPU", check=non_negative)
    demo_data_root: Path = setting(
        Path("data/demo"), "where the demo corpus is built when neither --data-path nor --mock-data is given"
    )


@dataclass
class EvalConfig:
    eval_interval: int = setting(50, "steps between per-domain validations", check=positive)
    eval_iters: int = setting(2, "global batches per domain and validation; 0 disables", check=non_negative)


@dataclass
class CheckpointConfig:
    save: Path | None = setting(None, "checkpoint directory to write")
    load: Path | None = setting(None, "checkpoint directory to resume from (missing or empty: start afresh)")
    save_interval: int | None = setting(None, "steps between checkpoints (needs --save)", check=positive)
    load_optim: bool = setting(
        True, "load the optimizer state on resume; --no-load-optim: fresh Adam moments, the iteration and LR "
        "schedule continue (e.g. to change TP/PP under the distributed optimizer)",
    )  # fmt: skip
    load_rng: bool = setting(True, "load the saved RNG states on resume")
    ckpt_step: int | None = setting(
        None, "resume from this iteration's checkpoint instead of the latest", check=positive
    )
    ckpt_checksums: bool = setting(True, "record a checksum of every checkpoint file at save, verify them at load")
    exit_duration_in_mins: float | None = setting(None, "save and exit after this many minutes", check=positive)
    exit_interval: int | None = setting(None, "save and exit when iteration % N == 0", check=positive)
    exit_signal_handler: bool = setting(True, "on --exit-signal: save a checkpoint (with --save) and exit 0")
    exit_signal: str = setting("SIGTERM", "signal name, e.g. SIGTERM or SIGUSR1")
    dist_ckpt_optim_fully_reshardable: bool = setting(
        False, "distributed-optimizer state in the DP/TP/PP-reshardable format (slower save)"
    )


@dataclass
class LoggingConfig:
    log_interval: int = setting(10, "steps between log lines", check=positive)
    tensorboard_dir: Path | None = setting(None, "TensorBoard event directory")
    wandb_project: str | None = setting(None, "Weights & Biases project")
    wandb_exp_name: str | None = setting(None, "Weights & Biases run name")
    wandb_save_dir: Path | None = setting(None, "where Weights & Biases writes the run (default: SAVE/wandb)")
    metrics_file: Path | None = setting(
        None, "JSON lines, one record per log step and per evaluation (default: SAVE/metrics.jsonl, else "
        "TENSORBOARD_DIR/metrics.jsonl)",
    )  # fmt: skip


@dataclass
class DeviceConfig:
    device: str = setting("auto", "auto: cuda when available", choices=("auto", "cpu", "cuda"))
    bf16: bool | None = setting(None, "bf16 parameters, fp32 main weights (default: on with CUDA)")
    transformer_impl: str | None = setting(
        None, "default: transformer_engine when importable on CUDA, else local", choices=("transformer_engine", "local")
    )
    # Megatron-LM's fusions, each on by default where its kernel exists (model.Kernels); off on CPU.
    bias_swiglu_fusion: bool | None = setting(None, "fused SwiGLU (default: on with CUDA)")
    bias_dropout_fusion: bool | None = setting(None, "fused residual add (default: on with CUDA)")
    masked_softmax_fusion: bool | None = setting(
        None, "fused attention softmax of the local layers (default: on with CUDA and Transformer Engine or apex)"
    )
    persist_layer_norm: bool | None = setting(None, "apex's persistent layer-norm kernel (default: on with CUDA)")
    rope_fusion: bool | None = setting(None, "fused RoPE (default: on with Transformer Engine)")
    gradient_accumulation_fusion: bool | None = setting(
        None, "weight gradients accumulated into the fp32 main grads in the GEMM (default: on with CUDA and apex)"
    )


DEFAULT_PRESET = "tiny"  # a run without --preset


@dataclass
class TrainConfig:
    preset: str = DEFAULT_PRESET
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    reweight: ReweightConfig = field(default_factory=ReweightConfig)

    def to_dict(self) -> dict:
        """The one serialisation of a run's configuration: logged, and stored in checkpoints."""
        return to_dict(self)


# (section title, TrainConfig field) in the order of `--help`.
SECTIONS = (
    ("model", "model"),
    ("parallelism", "parallel"),
    ("batch and schedule", "optim"),
    ("precision and device", "device"),
    ("data", "data"),
    ("evaluation (per-domain validation loss)", "eval"),
    ("checkpoints", "checkpoint"),
    ("logging", "logging"),
)

# The trainer reweights by default; the plugin's default strategy (uniform) leaves a
# Megatron-LM run unchanged until asked.
TRAINER_DEFAULTS = {"reweight_strategy": "linupper"}


@dataclass(frozen=True)
class Preset:
    description: str
    overrides: dict  # flag dest (e.g. "num_layers") -> value; the rest keeps its default


# The papers' model shapes (dynamic loss-based reweighting, Appendix A.2, Tables 6 and 7) as
# Llama-architecture models, with each table's training schedule. Table 6 gives the embedding
# width of GPT2-small and GPT2-medium as 786: a typo for 768 (786 is not divisible by 16 or 24
# heads; 768 is GPT-2's width and matches the parameter counts). The GPT-2 rows become Llama
# models here (RMSNorm, SwiGLU, RoPE, untied embeddings, no bias); their "hidden dimension" 3072
# is the SwiGLU FFN width. The GPT-2 runs used Hugging Face's Trainer, hence Adam betas
# (0.9, 0.999). Table 6's "hidden dimension" of the Llama rows repeats the embedding width; the
# FFN widths are Llama-2-7B's 11008 and, for 1.4B, 5632 (the 2.75x SwiGLU width of
# TinyLlama-style 2048-wide models), about 1.4B parameters with a 32k vocab. global_batch_size
# is the table's "minibatch size", in sequences. The paper holds r at 100 for "a specific number
# of warmup steps" without the number; the presets use the learning-rate warm-up length.
_GPT2 = dict(
    ffn_hidden_size=3072, seq_length=512, lr=5e-4, min_lr=1e-4, lr_warmup_iters=500, train_iters=20_000,
    reweight_r=0.4, reweight_r_warmup_steps=500, adam_beta2=0.999, eval_interval=2000, eval_iters=10,
    reweight_window="global-batch",  # Table 7's minibatch is the weighting window
)  # fmt: skip
_LLAMA = dict(
    seq_length=8192, global_batch_size=128, micro_batch_size=1, lr=3e-4, min_lr=3e-5, lr_warmup_iters=2000,
    reweight_r_warmup_steps=2000, eval_interval=5000, eval_iters=10, reweight_window="global-batch",
)  # fmt: skip
PRESETS: dict[str, Preset] = {
    "tiny": Preset("CPU-sized model for the demo run, tests and CI (the declared defaults)", dict(
        reweight_r=0.4, reweight_r_warmup_steps=10,
    )),
    "gpt2-mini": Preset("Table 6 GPT2-mini (124M) as a Llama model", dict(
        _GPT2, num_layers=12, hidden_size=768, num_attention_heads=12, num_query_groups=12, global_batch_size=32,
    )),
    "gpt2-small": Preset("Table 6 GPT2-small (210M) as a Llama model", dict(
        _GPT2, num_layers=24, hidden_size=768, num_attention_heads=16, num_query_groups=16, global_batch_size=48,
        micro_batch_size=2,
    )),
    "gpt2-medium": Preset("Table 6 GPT2-medium (300M) as a Llama model", dict(
        _GPT2, num_layers=36, hidden_size=768, num_attention_heads=24, num_query_groups=24, global_batch_size=48,
        micro_batch_size=2,
    )),
    "llama-1.4b": Preset("Table 6 Llama 1.4B", dict(
        _LLAMA, num_layers=24, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16, num_query_groups=16,
        train_iters=100_000, reweight_r=1.0,
    )),
    "llama-7b": Preset("Table 6 Llama 7B (Llama-2-7B shape, sequence length 8192)", dict(
        _LLAMA, num_layers=32, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32, num_query_groups=32,
        train_iters=170_000, reweight_r=2.0,
    )),
}  # fmt: skip


def preset_config(name: str) -> TrainConfig:
    """A preset's settings before the command line (defaults that follow from other settings,
    such as --lr-decay-iters, are left unresolved)."""
    return build(TrainConfig, {**TRAINER_DEFAULTS, **PRESETS[name].overrides}, preset=name)
