"""Command line -> TrainConfig, with every check that can run before training starts.

The flags are derived from the settings declared in `config.py` (and the model's and the
reweighting's dataclasses). A setting's value is, in order: the flag when given, the chosen
preset's override, the trainer's default (`TRAINER_DEFAULTS`), the declared default. Parsing
reads no data and writes nothing: preparing the data is a step of the run.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from megatron_reweight.arguments import add_reweight_args, reweight_config_from_args
from megatron_reweight.extras import MissingExtraError, require_extra
from megatron_reweight.settings import add_arguments, build, check_settings, check_values, values_of
from megatron_reweight.training.config import (
    DEFAULT_PRESET,
    PRESETS,
    SECTIONS,
    TRAINER_DEFAULTS,
    TrainConfig,
    preset_config,
)
from megatron_reweight.training.errors import ConfigError


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), raised as ConfigError."""

    def error(self, message):
        raise ConfigError(message)


def _preset_note(dest: str) -> str:
    if any(dest in preset.overrides for preset in PRESETS.values()):
        return f"the {DEFAULT_PRESET} preset's, other presets set their own"
    return ""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pretrain_llama.py",
        description="Pretrain a Llama model with megatron-core and dynamic loss-based sample reweighting. "
        f"Each default shown is the value of a run without flags (--preset {DEFAULT_PRESET}). "
        "Flags and defaults: docs/training.md.",
    )
    parser.add_argument(
        "--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
        help=f"model shape and training defaults (default {DEFAULT_PRESET})",
    )  # fmt: skip
    # The help's defaults are the settings of a plain run, the default preset's.
    defaults = values_of(preset_config(DEFAULT_PRESET))
    sections = TrainConfig.__dataclass_fields__
    for title, name in SECTIONS:
        add_arguments(parser.add_argument_group(title), sections[name].default_factory, defaults, _preset_note)
    add_reweight_args(parser, defaults, _preset_note)
    return parser


def config_from_args(args: argparse.Namespace, world_size: int | None = None) -> TrainConfig:
    """Build and check the run's configuration. Raises ConfigError on bad input."""
    world_size = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    config = settings_from_args(args)
    check_settings(config, ConfigError)
    _resolve_defaults(config)
    validate(config, world_size)
    return config


def settings_from_args(args: argparse.Namespace) -> TrainConfig:
    """The settings a command line asks for, before the checks (and before the defaults that
    depend on this machine, such as --device auto, are resolved)."""
    preset = PRESETS[args.preset].overrides
    given = {name: value for name, value in vars(args).items() if value is not None}
    check_values(TrainConfig, given, ConfigError)  # what the user wrote, before anything derived from it
    values = {**TRAINER_DEFAULTS, **preset, **given}
    defaults = preset_config(args.preset)
    # The preset's warm-ups are cut to fit a shortened run.
    train_iters = values.get("train_iters", defaults.optim.train_iters)
    if "lr_warmup_iters" not in given:
        values["lr_warmup_iters"] = min(defaults.optim.lr_warmup_iters, train_iters - 1)
    if "reweight_r_warmup_steps" not in given:
        values["reweight_r_warmup_steps"] = min(defaults.reweight.temperature.warmup_steps, train_iters)
    if "num_attention_heads" in given and "num_query_groups" not in given:
        # A changed head count keeps the preset's heads-per-group ratio when it can.
        ratio = defaults.model.num_attention_heads // defaults.model.num_query_groups
        values["num_query_groups"] = max(1, given["num_attention_heads"] // ratio)

    try:
        reweight = reweight_config_from_args(args, values)
    except ValueError as error:
        raise ConfigError(f"reweighting: {error}") from None
    return build(TrainConfig, values, preset=args.preset, reweight=reweight)


def _resolve_defaults(config: TrainConfig) -> None:
    """Settings whose default follows from others."""
    import torch

    from megatron_reweight.model import Kernels, transformer_engine_available

    m, o, d, data = config.model, config.optim, config.device, config.data
    m.max_position_embeddings = m.max_position_embeddings or m.seq_length
    o.lr_decay_iters = o.lr_decay_iters or o.train_iters
    if d.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    d.device = "cuda" if d.device == "cuda" or (d.device == "auto" and torch.cuda.is_available()) else "cpu"
    if d.transformer_impl is None:
        d.transformer_impl = "transformer_engine" if d.device == "cuda" and transformer_engine_available() else "local"
    d.bf16 = d.device == "cuda" if d.bf16 is None else d.bf16
    kernels = Kernels.detect(d.device == "cuda", d.transformer_impl == "transformer_engine")
    for name, available in kernels.available().items():
        if getattr(d, name) is None:
            setattr(d, name, available)  # Megatron-LM's default (on), where the kernel exists
        elif getattr(d, name) and not available:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} needs {Kernels.NEEDS[name]}; drop it (or pass --no-{flag[2:]})")
    if data.num_workers is None:
        data.num_workers = 2 if d.device == "cuda" else 0
    if data.mock_data and data.tokenizer_model is None and data.vocab_size is None:
        data.vocab_size = 4096
    if data.data_cache_path is None and data.data_path is not None and config.checkpoint.save is not None:
        data.data_cache_path = config.checkpoint.save / "data-cache"  # the run's folder, not the data's
    config.checkpoint.exit_signal = _signal_name(config.checkpoint.exit_signal)
    log = config.logging
    if log.metrics_file is None:
        directory = config.checkpoint.save or log.tensorboard_dir
        log.metrics_file = directory / "metrics.jsonl" if directory else None
    if log.wandb_project and log.wandb_save_dir is None and config.checkpoint.save:
        log.wandb_save_dir = config.checkpoint.save / "wandb"  # as Megatron-LM


def _signal_name(name: str) -> str:
    name = name.upper()
    return name if name.startswith("SIG") else "SIG" + name


def validate(config: TrainConfig, world_size: int) -> None:
    """The checks that relate settings to each other (each setting's own check is declared)."""
    _check_layout(config, world_size)
    o = config.optim
    if o.min_lr > o.lr:
        raise ConfigError(f"--min-lr {o.min_lr} is above --lr {o.lr}")
    if o.lr_warmup_iters >= o.lr_decay_iters and o.lr_decay_style != "constant":
        raise ConfigError(f"--lr-warmup-iters {o.lr_warmup_iters} must be below --lr-decay-iters {o.lr_decay_iters}")
    _check_device(config)
    _check_data(config)
    _check_checkpoint(config)
    _check_extras(config)


def _check_layout(config: TrainConfig, world_size: int) -> None:
    """Megatron's divisibility rules."""
    m, par, opt = config.model, config.parallel, config.optim
    tp, pp, cp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size
    if world_size % (tp * pp * cp):
        raise ConfigError(
            f"world size {world_size} is not divisible by TP x PP x CP = {tp} x {pp} x {cp} = {tp * pp * cp}"
        )
    dp = world_size // (tp * pp * cp)
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads {m.num_attention_heads}"
        )
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(
            f"--num-attention-heads {m.num_attention_heads} is not divisible by --num-query-groups {m.num_query_groups}"
        )
    for flag, value in (
        ("--num-attention-heads", m.num_attention_heads), ("--num-query-groups", m.num_query_groups),
        ("--ffn-hidden-size", m.ffn_hidden_size),
    ):  # fmt: skip
        if value % tp:
            raise ConfigError(f"--tensor-model-parallel-size {tp} does not divide {flag} {value}")
    if m.num_layers % pp:
        raise ConfigError(f"--pipeline-model-parallel-size {pp} does not divide --num-layers {m.num_layers}")
    if cp > 1 and m.seq_length % (2 * cp):
        raise ConfigError(f"--seq-length {m.seq_length} is not divisible by 2 x --context-parallel-size = {2 * cp}")
    if par.sequence_parallel and tp == 1:
        raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if par.sequence_parallel and (m.seq_length // cp) % tp:
        raise ConfigError(
            f"--sequence-parallel: the sequence length per CP rank ({m.seq_length // cp}) is not divisible "
            f"by --tensor-model-parallel-size {tp}"
        )
    if m.max_position_embeddings < m.seq_length:
        raise ConfigError(f"--max-position-embeddings {m.max_position_embeddings} is below --seq-length {m.seq_length}")
    if opt.global_batch_size % (opt.micro_batch_size * dp):
        raise ConfigError(
            f"--global-batch-size {opt.global_batch_size} is not divisible by --micro-batch-size "
            f"{opt.micro_batch_size} x data-parallel size {dp} = {opt.micro_batch_size * dp}"
        )
    if par.overlap_param_gather and not par.use_distributed_optimizer:
        raise ConfigError("--overlap-param-gather needs --use-distributed-optimizer")
    _check_recompute(par, m.num_layers // pp)


def _check_recompute(par, layers_per_stage: int) -> None:
    """Megatron's rules for --recompute-granularity, --recompute-method and --recompute-num-layers."""
    if par.recompute_granularity == "full":
        if par.recompute_method is None or par.recompute_num_layers is None:
            raise ConfigError("--recompute-granularity full needs --recompute-method (block or uniform) and --recompute-num-layers")
        if par.recompute_num_layers > layers_per_stage:
            raise ConfigError(
                f"--recompute-num-layers {par.recompute_num_layers} is above the {layers_per_stage} layers per pipeline stage"
            )
    elif par.recompute_method is not None or par.recompute_num_layers is not None:
        flag = "--recompute-method" if par.recompute_method is not None else "--recompute-num-layers"
        granularity = par.recompute_granularity or "none"
        raise ConfigError(f"{flag} is for --recompute-granularity full, not {granularity}")


def _check_device(config: TrainConfig) -> None:
    from megatron_reweight.model import transformer_engine_available

    if config.device.transformer_impl == "transformer_engine":
        if config.device.device != "cuda":
            raise ConfigError("--transformer-impl transformer_engine needs --device cuda")
        if not transformer_engine_available():
            raise ConfigError("--transformer-impl transformer_engine: transformer_engine is not installed")
    if config.parallel.sequence_parallel and config.device.transformer_impl != "transformer_engine":
        # megatron-core's local spec normalises with torch's RMSNorm, which has no sequence parallelism.
        raise ConfigError(
            "--sequence-parallel needs Transformer Engine's layers (--transformer-impl transformer_engine)"
        )


def _check_data(config: TrainConfig) -> None:
    from megatron_reweight.training.data import parse_blend

    data = config.data
    if data.mock_data and data.data_path:
        raise ConfigError("--mock-data and --data-path exclude each other")
    if data.data_path is not None:
        parse_blend(data.data_path)
        if data.tokenizer_model is None:
            raise ConfigError("--data-path needs --tokenizer-model (the tokenizer.json the data was made with)")
    if data.vocab_size is not None and data.tokenizer_model is not None:
        raise ConfigError("--vocab-size is for --mock-data without a tokenizer; the tokenizer sets the vocabulary")


def _check_checkpoint(config: TrainConfig) -> None:
    ck = config.checkpoint
    if not hasattr(signal, ck.exit_signal):
        raise ConfigError(f"--exit-signal {ck.exit_signal}: unknown signal")
    if ck.save_interval and ck.save is None:
        raise ConfigError("--save-interval needs --save DIR")
    for flag, directory in (("--save", ck.save), ("--load", ck.load)):
        if directory is not None and directory.exists() and not directory.is_dir():
            raise ConfigError(f"{flag} {directory}: exists and is not a directory")
    if ck.load is not None and ck.load.is_dir() and not os.access(ck.load, os.R_OK | os.X_OK):
        raise ConfigError(f"--load {ck.load}: permission denied (the checkpoint directory must be readable)")
    if ck.ckpt_step is not None and ck.load is None:
        raise ConfigError("--ckpt-step needs --load DIR")
    if config.optim.override_opt_param_scheduler and config.optim.use_checkpoint_opt_param_scheduler:
        raise ConfigError("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler exclude each other")
    if ck.dist_ckpt_optim_fully_reshardable:
        from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

        if not HAVE_APEX_OR_TE:
            # megatron-core 0.16.1 cannot load this format into its torch-Adam fallback.
            raise ConfigError("--dist-ckpt-optim-fully-reshardable needs Transformer Engine or Apex optimizers")
    if ck.save is not None:
        try:
            import psutil  # noqa: F401
        except ImportError:
            # megatron-core's torch_dist writer processes need it; without it a save hangs.
            raise ConfigError(
                "--save needs the psutil package (megatron-core's checkpoint writer): pip install psutil"
            ) from None


def _check_extras(config: TrainConfig) -> None:
    """The optional packages the run needs, named with the extra that installs them."""
    needs = []
    if config.data.data_path is None and not config.data.mock_data:
        needs.append(("data", "the demo corpus (no --data-path given)", ", or pass --data-path or --mock-data"))
    if config.logging.tensorboard_dir is not None:
        needs.append(("train", "--tensorboard-dir", ""))
    if config.logging.wandb_project:
        needs.append(("wandb", "--wandb-project", ""))
    if config.reweight.audit_dir is not None:
        needs.append(("data", "--reweight-audit-dir (Parquet)", ""))
    for extra, needed_for, alternative in needs:
        try:
            require_extra(extra, needed_for)
        except MissingExtraError as error:
            raise ConfigError(f"{error}{alternative}") from None


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Parse a command line (default sys.argv[1:]) into a checked TrainConfig."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return config_from_args(args)
