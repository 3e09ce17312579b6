"""Command line -> TrainConfig, with every check that can run before training starts.

Flag names are Megatron-LM's where Megatron has one (docs/cli-contract.md). Model and
schedule flags default to the chosen preset's values; the reweighting flags come from
`megatron_reweight.arguments.add_reweight_args`, with the strategy defaulting to LinUpper
and r / its warm-up to the preset's Table 7 values.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from megatron_reweight.arguments import add_reweight_args, reweight_config_from_args
from megatron_reweight.training.config import (
    PRESETS,
    CheckpointConfig,
    DataConfig,
    DeviceConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
)
from megatron_reweight.training.errors import ConfigError

DEFAULT_DEMO_ROOT = Path("data/demo")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), raised as ConfigError."""

    def error(self, message):
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pretrain_llama.py",
        description="Pretrain a Llama model with megatron-core and dynamic loss-based sample reweighting. "
        "Flags and defaults: docs/training.md.",
    )
    model = parser.add_argument_group("model (defaults: the preset's)")
    model.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model shape and training defaults")
    for flag in (
        "--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads", "--num-query-groups",
        "--seq-length", "--max-position-embeddings",
    ):  # fmt: skip
        model.add_argument(flag, type=int, default=None)
    model.add_argument("--rotary-base", type=int, default=10000)
    model.add_argument("--norm-epsilon", type=float, default=1e-5)
    model.add_argument("--init-method-std", type=float, default=0.02)
    model.add_argument("--make-vocab-size-divisible-by", type=int, default=128)

    par = parser.add_argument_group("parallelism")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1)
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    par.add_argument("--context-parallel-size", type=int, default=1)
    par.add_argument("--sequence-parallel", action="store_true")
    par.add_argument("--use-distributed-optimizer", action="store_true")
    par.add_argument("--overlap-grad-reduce", action="store_true")
    par.add_argument("--overlap-param-gather", action="store_true")
    par.add_argument("--distributed-timeout-minutes", type=int, default=10)

    opt = parser.add_argument_group("batch and schedule (defaults: the preset's)")
    opt.add_argument("--micro-batch-size", type=int, default=None)
    opt.add_argument("--global-batch-size", type=int, default=None)
    opt.add_argument("--train-iters", type=int, default=None)
    opt.add_argument("--lr", type=float, default=None)
    opt.add_argument("--min-lr", type=float, default=None)
    opt.add_argument("--lr-warmup-iters", type=int, default=None)
    opt.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    opt.add_argument("--lr-decay-style", choices=("cosine", "linear", "constant"), default="cosine")
    opt.add_argument("--weight-decay", type=float, default=None)
    opt.add_argument("--clip-grad", type=float, default=None)
    opt.add_argument("--adam-beta1", type=float, default=None)
    opt.add_argument("--adam-beta2", type=float, default=None)
    opt.add_argument("--adam-eps", type=float, default=1e-8)
    opt.add_argument("--seed", type=int, default=1234)

    dev = parser.add_argument_group("precision and device")
    dev.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on with CUDA")
    dev.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    dev.add_argument(
        "--transformer-impl", choices=("transformer_engine", "local"), default=None,
        help="default: transformer_engine when importable on CUDA, else local",
    )  # fmt: skip

    data = parser.add_argument_group("data")
    data.add_argument("--data-path", nargs="+", default=None, help="Megatron blend: [W1] PREFIX1 [W2 PREFIX2 ...]")
    data.add_argument("--mock-data", action="store_true", help="megatron-core's MockGPTDataset")
    data.add_argument("--split", default="969,30,1", help="train,valid,test document split of every prefix")
    data.add_argument("--tokenizer-model", type=Path, default=None, help="Hugging Face tokenizer.json")
    data.add_argument("--vocab-size", type=int, default=None, help="with --mock-data and no tokenizer (default 4096)")
    data.add_argument("--data-cache-path", type=Path, default=None)
    data.add_argument("--num-workers", type=int, default=None, help="data-loader workers (default 2 on CUDA, 0 on CPU)")
    data.add_argument(
        "--demo-data-root", type=Path, default=DEFAULT_DEMO_ROOT,
        help="where the offline demo corpus is built when neither --data-path nor --mock-data is given",
    )  # fmt: skip

    ev = parser.add_argument_group("evaluation (per-domain validation loss)")
    ev.add_argument("--eval-interval", type=int, default=None)
    ev.add_argument("--eval-iters", type=int, default=None, help="global batches per domain; 0 disables")

    ck = parser.add_argument_group("checkpoints")
    ck.add_argument("--save", type=Path, default=None)
    ck.add_argument("--load", type=Path, default=None)
    ck.add_argument("--save-interval", type=int, default=None)
    ck.add_argument(
        "--no-load-optim", action="store_true",
        help="resume without the optimizer state (fresh Adam moments; iteration and LR schedule continue), "
        "e.g. to change TP/PP under the distributed optimizer",
    )  # fmt: skip
    ck.add_argument("--no-load-rng", action="store_true", help="resume without the saved RNG states")
    ck.add_argument("--exit-duration-in-mins", type=float, default=None)
    ck.add_argument("--exit-interval", type=int, default=None, help="save and exit when iteration %% N == 0")
    ck.add_argument(
        "--exit-signal-handler", action=argparse.BooleanOptionalAction, default=True,
        help="on --exit-signal: save a checkpoint (with --save) and exit 0",
    )  # fmt: skip
    ck.add_argument("--exit-signal", default="SIGTERM", help="signal name, e.g. SIGTERM or SIGUSR1")
    ck.add_argument(
        "--dist-ckpt-optim-fully-reshardable", action="store_true",
        help="distributed-optimizer state in the DP/TP/PP-reshardable format (slower save)",
    )  # fmt: skip

    log = parser.add_argument_group("logging")
    log.add_argument("--log-interval", type=int, default=None)
    log.add_argument("--tensorboard-dir", type=Path, default=None)
    log.add_argument("--wandb-project", default=None)
    log.add_argument("--wandb-exp-name", default=None)
    log.add_argument(
        "--metrics-file", type=Path, default=None,
        help="JSON lines, one record per log step and per evaluation (default: SAVE/metrics.jsonl, else "
        "TENSORBOARD_DIR/metrics.jsonl)",
    )  # fmt: skip

    add_reweight_args(parser)
    # The trainer's defaults: LinUpper, with the preset's r and r warm-up.
    parser.set_defaults(reweight_strategy="linupper", reweight_r=None, reweight_r_warmup_steps=None)
    return parser


def _pick(value, default):
    return default if value is None else value


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _resolve_device(args) -> DeviceConfig:
    import torch

    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise ConfigError("--device cuda: no CUDA device is available")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and cuda) else "cpu"
    from megatron_reweight.model import transformer_engine_available

    impl = args.transformer_impl
    if impl is None:
        impl = "transformer_engine" if device == "cuda" and transformer_engine_available() else "local"
    if impl == "transformer_engine":
        if device != "cuda":
            raise ConfigError("--transformer-impl transformer_engine needs --device cuda")
        if not transformer_engine_available():
            raise ConfigError("--transformer-impl transformer_engine: transformer_engine is not installed")
    bf16 = _pick(args.bf16, device == "cuda")
    return DeviceConfig(device=device, bf16=bf16, transformer_impl=impl)


def _data_config(args, default_num_workers: int) -> DataConfig:
    from megatron_reweight.training.data import check_indexed_dataset, domain_names, parse_blend

    if args.mock_data and args.data_path:
        raise ConfigError("--mock-data and --data-path exclude each other")
    tokenizer_model = args.tokenizer_model
    data_cache_path = args.data_cache_path
    prefixes = weights = None
    if args.mock_data:
        domains = ["mock"]
    else:
        if args.data_path is None:
            demo = _demo_data(args.demo_data_root)
            data_path = list(demo.data_path)
            tokenizer_model = tokenizer_model or Path(demo.tokenizer_path)
            data_cache_path = data_cache_path or Path(args.demo_data_root) / "cache"
        else:
            data_path = args.data_path
            if tokenizer_model is None:
                raise ConfigError("--data-path needs --tokenizer-model (the tokenizer.json the data was made with)")
        prefixes, weights = parse_blend(data_path)
        for prefix in prefixes:
            check_indexed_dataset(prefix)
        domains = domain_names(prefixes)
    if args.vocab_size is not None and tokenizer_model is not None:
        raise ConfigError("--vocab-size is for --mock-data without a tokenizer; the tokenizer sets the vocabulary")
    return DataConfig(
        data_prefixes=prefixes,
        data_weights=weights,
        mock_data=args.mock_data,
        split=args.split,
        tokenizer_model=tokenizer_model,
        vocab_size=args.vocab_size,
        data_cache_path=data_cache_path,
        num_workers=_pick(args.num_workers, default_num_workers),
        domains=domains,
    )


def _demo_data(root: Path):
    """The offline demo corpus (built on first use; safe from several ranks at once)."""
    try:
        from megatron_reweight.data.demo import ensure_demo_data
    except ImportError as error:
        raise ConfigError(
            f"no --data-path given and the demo corpus is unavailable ({error}); pass --data-path or --mock-data"
        ) from None
    return ensure_demo_data(root)


def _check_layout(model: ModelConfig, par: ParallelConfig, opt: OptimConfig, world_size: int) -> int:
    """Megatron's divisibility rules; returns the data-parallel size."""
    tp, pp, cp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size
    for name, value in (
        ("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
        ("--context-parallel-size", cp), ("--num-layers", model.num_layers), ("--hidden-size", model.hidden_size),
        ("--ffn-hidden-size", model.ffn_hidden_size), ("--num-attention-heads", model.num_attention_heads),
        ("--num-query-groups", model.num_query_groups), ("--seq-length", model.seq_length),
        ("--micro-batch-size", opt.micro_batch_size), ("--global-batch-size", opt.global_batch_size),
        ("--train-iters", opt.train_iters),
    ):  # fmt: skip
        _positive(name, value)
    if world_size % (tp * pp * cp):
        raise ConfigError(
            f"world size {world_size} is not divisible by TP x PP x CP = {tp} x {pp} x {cp} = {tp * pp * cp}"
        )
    dp = world_size // (tp * pp * cp)
    if model.hidden_size % model.num_attention_heads:
        raise ConfigError(
            f"--hidden-size {model.hidden_size} is not divisible by --num-attention-heads {model.num_attention_heads}"
        )
    if model.num_attention_heads % model.num_query_groups:
        raise ConfigError(
            f"--num-attention-heads {model.num_attention_heads} is not divisible by "
            f"--num-query-groups {model.num_query_groups}"
        )
    if model.num_attention_heads % tp:
        raise ConfigError(
            f"--tensor-model-parallel-size {tp} does not divide --num-attention-heads {model.num_attention_heads}"
        )
    if model.num_query_groups % tp:
        raise ConfigError(
            f"--tensor-model-parallel-size {tp} does not divide --num-query-groups {model.num_query_groups}"
        )
    if model.ffn_hidden_size % tp:
        raise ConfigError(
            f"--tensor-model-parallel-size {tp} does not divide --ffn-hidden-size {model.ffn_hidden_size}"
        )
    if model.num_layers % pp:
        raise ConfigError(f"--pipeline-model-parallel-size {pp} does not divide --num-layers {model.num_layers}")
    if cp > 1 and model.seq_length % (2 * cp):
        raise ConfigError(f"--seq-length {model.seq_length} is not divisible by 2 x --context-parallel-size = {2 * cp}")
    if par.sequence_parallel and tp == 1:
        raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if par.sequence_parallel and (model.seq_length // cp) % tp:
        raise ConfigError(
            f"--sequence-parallel: the sequence length per CP rank ({model.seq_length // cp}) is not divisible "
            f"by --tensor-model-parallel-size {tp}"
        )
    if model.max_position_embeddings < model.seq_length:
        raise ConfigError(
            f"--max-position-embeddings {model.max_position_embeddings} is below --seq-length {model.seq_length}"
        )
    if opt.global_batch_size % (opt.micro_batch_size * dp):
        raise ConfigError(
            f"--global-batch-size {opt.global_batch_size} is not divisible by --micro-batch-size "
            f"{opt.micro_batch_size} x data-parallel size {dp} = {opt.micro_batch_size * dp}"
        )
    if par.overlap_param_gather and not par.use_distributed_optimizer:
        raise ConfigError("--overlap-param-gather needs --use-distributed-optimizer")
    return dp


def _signal_name(name: str) -> str:
    name = name.upper()
    return name if name.startswith("SIG") else "SIG" + name


def config_from_args(args: argparse.Namespace, world_size: int | None = None) -> TrainConfig:
    """Build and check the run's configuration. Raises ConfigError on bad input."""
    world_size = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    preset = PRESETS[args.preset]
    seq_length = _pick(args.seq_length, preset.seq_length)
    model = ModelConfig(
        preset=args.preset,
        num_layers=_pick(args.num_layers, preset.num_layers),
        hidden_size=_pick(args.hidden_size, preset.hidden_size),
        ffn_hidden_size=_pick(args.ffn_hidden_size, preset.ffn_hidden_size),
        num_attention_heads=_pick(args.num_attention_heads, preset.num_attention_heads),
        num_query_groups=_pick(args.num_query_groups, preset.num_query_groups),
        seq_length=seq_length,
        max_position_embeddings=_pick(args.max_position_embeddings, seq_length),
        rotary_base=args.rotary_base,
        norm_epsilon=args.norm_epsilon,
        init_method_std=args.init_method_std,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
    )
    if args.num_attention_heads is not None and args.num_query_groups is None:
        # A changed head count keeps the preset's heads-per-group ratio when it can.
        ratio = preset.num_attention_heads // preset.num_query_groups
        model.num_query_groups = max(1, model.num_attention_heads // ratio)
    parallel = ParallelConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        sequence_parallel=args.sequence_parallel,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        distributed_timeout_minutes=args.distributed_timeout_minutes,
    )
    train_iters = _pick(args.train_iters, preset.train_iters)
    optim = OptimConfig(
        micro_batch_size=_pick(args.micro_batch_size, preset.micro_batch_size),
        global_batch_size=_pick(args.global_batch_size, preset.global_batch_size),
        train_iters=train_iters,
        lr=_pick(args.lr, preset.lr),
        min_lr=_pick(args.min_lr, preset.min_lr),
        lr_warmup_iters=_pick(args.lr_warmup_iters, min(preset.lr_warmup_iters, train_iters - 1)),
        lr_decay_iters=_pick(args.lr_decay_iters, train_iters),
        lr_decay_style=args.lr_decay_style,
        weight_decay=_pick(args.weight_decay, preset.weight_decay),
        clip_grad=_pick(args.clip_grad, preset.clip_grad),
        adam_beta1=_pick(args.adam_beta1, preset.adam_beta1),
        adam_beta2=_pick(args.adam_beta2, preset.adam_beta2),
        adam_eps=args.adam_eps,
        seed=args.seed,
    )
    _positive("--lr", optim.lr)
    _positive("--min-lr", optim.min_lr, allow_zero=True)
    if optim.min_lr > optim.lr:
        raise ConfigError(f"--min-lr {optim.min_lr} is above --lr {optim.lr}")
    _positive("--lr-warmup-iters", optim.lr_warmup_iters, allow_zero=True)
    _positive("--lr-decay-iters", optim.lr_decay_iters)
    if optim.lr_warmup_iters >= optim.lr_decay_iters and optim.lr_decay_style != "constant":
        raise ConfigError(
            f"--lr-warmup-iters {optim.lr_warmup_iters} must be below --lr-decay-iters {optim.lr_decay_iters}"
        )
    _positive("--weight-decay", optim.weight_decay, allow_zero=True)
    _positive("--clip-grad", optim.clip_grad, allow_zero=True)

    _check_layout(model, parallel, optim, world_size)
    device = _resolve_device(args)
    if parallel.sequence_parallel and device.transformer_impl != "transformer_engine":
        # megatron-core's local spec normalises with torch's RMSNorm, which has no sequence parallelism.
        raise ConfigError(
            "--sequence-parallel needs Transformer Engine's layers (--transformer-impl transformer_engine)"
        )

    evaluation = EvalConfig(
        eval_interval=_pick(args.eval_interval, preset.eval_interval),
        eval_iters=_pick(args.eval_iters, preset.eval_iters),
    )
    _positive("--eval-interval", evaluation.eval_interval)
    _positive("--eval-iters", evaluation.eval_iters, allow_zero=True)

    checkpoint = CheckpointConfig(
        save=args.save,
        load=args.load,
        save_interval=args.save_interval,
        exit_duration_in_mins=args.exit_duration_in_mins,
        exit_interval=args.exit_interval,
        exit_signal_handler=args.exit_signal_handler,
        exit_signal=_signal_name(args.exit_signal),
        fully_reshardable_optimizer=args.dist_ckpt_optim_fully_reshardable,
        load_optimizer=not args.no_load_optim,
        load_rng=not args.no_load_rng,
    )
    if not hasattr(signal, checkpoint.exit_signal):
        raise ConfigError(f"--exit-signal {args.exit_signal}: unknown signal")
    _positive("--save-interval", checkpoint.save_interval)
    _positive("--exit-interval", checkpoint.exit_interval)
    _positive("--exit-duration-in-mins", checkpoint.exit_duration_in_mins)
    if checkpoint.save_interval and checkpoint.save is None:
        raise ConfigError("--save-interval needs --save DIR")
    if checkpoint.save is not None and checkpoint.save.exists() and not checkpoint.save.is_dir():
        raise ConfigError(f"--save {checkpoint.save}: exists and is not a directory")
    if checkpoint.fully_reshardable_optimizer:
        from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

        if not HAVE_APEX_OR_TE:
            # megatron-core 0.16.1 cannot load this format into its torch-Adam fallback.
            raise ConfigError("--dist-ckpt-optim-fully-reshardable needs Transformer Engine or Apex optimizers")
    if checkpoint.save is not None:
        try:
            import psutil  # noqa: F401
        except ImportError:
            # megatron-core's torch_dist writer processes need it; without it a save hangs.
            raise ConfigError(
                "--save needs the psutil package (megatron-core's checkpoint writer): pip install psutil"
            ) from None

    logging_config = LoggingConfig(
        log_interval=_pick(args.log_interval, preset.log_interval),
        tensorboard_dir=args.tensorboard_dir,
        wandb_project=args.wandb_project,
        wandb_exp_name=args.wandb_exp_name,
        metrics_file=args.metrics_file
        or (args.save / "metrics.jsonl" if args.save else None)
        or (args.tensorboard_dir / "metrics.jsonl" if args.tensorboard_dir else None),
    )
    _positive("--log-interval", logging_config.log_interval)

    args.reweight_r = _pick(args.reweight_r, preset.reweight_r)
    args.reweight_r_warmup_steps = _pick(args.reweight_r_warmup_steps, min(preset.reweight_r_warmup_steps, train_iters))
    try:
        reweight = reweight_config_from_args(args)
    except ValueError as error:
        raise ConfigError(f"reweighting: {error}") from None

    data = _data_config(args, 2 if device.device == "cuda" else 0)
    _positive("--num-workers", data.num_workers, allow_zero=True)
    if data.vocab_size is None and data.tokenizer_model is None:
        data.vocab_size = 4096  # --mock-data without a tokenizer
    _positive("--vocab-size", data.vocab_size)
    return TrainConfig(
        model=model, parallel=parallel, optim=optim, data=data, eval=evaluation, checkpoint=checkpoint,
        logging=logging_config, device=device, reweight=reweight,
    )  # fmt: skip


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Parse a command line (default sys.argv[1:]) into a checked TrainConfig."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return config_from_args(args)
