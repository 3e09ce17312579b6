"""Configuration parity with Megatron-LM: for each preset at its sbatch layout, Megatron-LM's own
argument parser, `validate_args`, `core_transformer_config_from_args`, its DDP config construction
and `get_megatron_optimizer_config` build the configuration of the equivalent `pretrain_gpt.py`
command (on CPU, no model). The TransformerConfig, DistributedDataParallelConfig and
OptimizerConfig that pretrain_llama.py builds must equal them field by field, except the intended
differences listed here and, with their reasons, in docs/training.md.

The GPU layouts are built as on a CUDA machine with Transformer Engine and apex (an NGC
container): Megatron-LM asks CUDA for the GPU's architecture (answered 9, Hopper), and the
trainer's kernel detection is answered "present". The `tiny` layout is the CPU run.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from tests.helpers import REPO
from tests.helpers.megatron_lm import AVAILABLE, REASON, llama_flags, megatron_lm_args
from tests.helpers.sbatch import sbatch_command

pytestmark = pytest.mark.skipif(not AVAILABLE, reason=REASON)
DOCS = REPO / "docs" / "training.md"

# Field -> why it differs, on every layout (the run's own choices).
INTENDED = {
    # Megatron-LM sets it to --seed; it seeds inference sampling only, and megatron-core 0.14 (the
    # oldest the project supports) has no such field.
    "transformer": {"inference_sampling_seed"},
    "ddp": set(),
    # Megatron-LM's argument defaults for features the trainer does not have (fp8, Muon, optimizer
    # CPU offload, Megatron-LM's timers); megatron-core's dataclass defaults are kept, unused.
    "optimizer": {"fp8_recipe", "muon_momentum", "optimizer_offload_fraction", "barrier_with_L1_time"},
}
# Further differences of the CPU run (megatron-core on CPU, which Megatron-LM does not support).
INTENDED_ON_CPU = {
    "transformer": {
        "use_cpu_initialization",  # no GPU to initialise on
        "bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion", "persist_layer_norm",
        "apply_rope_fusion", "gradient_accumulation_fusion",  # CUDA kernels
    },
}  # fmt: skip


def our_configs(trainer_args: list[str], world_size: int, on_gpu: bool, monkeypatch) -> tuple:
    """What pretrain_llama.py builds from these flags (on a CUDA machine with TE and apex if on_gpu)."""
    from megatron_reweight import model
    from megatron_reweight.training.arguments import build_parser, config_from_args
    from megatron_reweight.training.model import ddp_config, transformer_config_kwargs
    from megatron_reweight.training.optimizer import optimizer_config

    if on_gpu:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(model, "transformer_engine_available", lambda: True)
        monkeypatch.setattr(model, "_importable", lambda module: True)
    config = config_from_args(build_parser().parse_args(trainer_args), world_size)
    monkeypatch.undo()
    return config, transformer_config_kwargs(config), ddp_config(config), optimizer_config(config)


def pretrain_gpt_flags(config, world_size: int) -> list[str]:
    """The `pretrain_gpt.py` command equivalent to a pretrain_llama.py run."""
    m, p, o, d = config.model, config.parallel, config.optim, config.device
    flags = llama_flags(m, micro_batch=o.micro_batch_size, global_batch=o.global_batch_size, vocab_size=32000) + [
        "--train-iters", o.train_iters, "--lr", o.lr, "--min-lr", o.min_lr, "--lr-warmup-iters", o.lr_warmup_iters,
        "--lr-decay-iters", o.lr_decay_iters, "--lr-decay-style", o.lr_decay_style, "--weight-decay", o.weight_decay,
        "--clip-grad", o.clip_grad, "--adam-beta1", o.adam_beta1, "--adam-beta2", o.adam_beta2,
        "--adam-eps", o.adam_eps, "--seed", o.seed,
        "--tensor-model-parallel-size", p.tensor_model_parallel_size,
        "--pipeline-model-parallel-size", p.pipeline_model_parallel_size,
        "--context-parallel-size", p.context_parallel_size, "--transformer-impl", d.transformer_impl,
    ]  # fmt: skip
    switches = {
        "--bf16": d.bf16, "--sequence-parallel": p.sequence_parallel,
        "--use-distributed-optimizer": p.use_distributed_optimizer, "--overlap-grad-reduce": p.overlap_grad_reduce,
        "--overlap-param-gather": p.overlap_param_gather, "--calculate-per-token-loss": o.calculate_per_token_loss,
    }  # fmt: skip
    flags += [flag for flag, on in switches.items() if on]
    if not o.check_for_nan_in_loss_and_grad:
        flags.append("--no-check-for-nan-in-loss-and-grad")
    if p.recompute_granularity:
        flags += ["--recompute-granularity", p.recompute_granularity]
    if p.recompute_method:
        flags += ["--recompute-method", p.recompute_method, "--recompute-num-layers", p.recompute_num_layers]
    if d.device == "cpu":
        flags += ["--distributed-backend", "gloo"]
    return [str(flag) for flag in flags]


def megatron_lm_configs(flags: list[str], world_size: int, monkeypatch) -> tuple:
    """Megatron-LM's TransformerConfig arguments, DDP config and optimizer config for these flags."""
    args = megatron_lm_args(flags, world_size, monkeypatch)
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig
    from megatron.training import arguments, training

    @dataclasses.dataclass
    class Recorded(TransformerConfig):
        def __post_init__(self):  # TransformerConfig's own checks refuse the fusions without TE
            pass

    transformer = dataclasses.asdict(arguments.core_transformer_config_from_args(args, config_class=Recorded))
    # megatron/training/training.py, get_model: the DDP config from the same arguments.
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(DistributedDataParallelConfig) if hasattr(args, f.name)}
    kwargs.update(
        grad_reduce_in_fp32=args.accumulate_allreduce_grads_in_fp32,
        check_for_nan_in_grad=args.check_for_nan_in_loss_and_grad,
        check_for_large_grads=args.check_for_large_grads,
        bucket_size=args.ddp_bucket_size,
        pad_buckets_for_high_nccl_busbw=args.ddp_pad_buckets_for_high_nccl_busbw,
        reduce_scatter_with_fp32_accumulation=args.ddp_reduce_scatter_with_fp32_accumulation,
        average_in_collective=args.ddp_average_in_collective,
    )
    optimizer, _ = training.get_megatron_optimizer_config(args)
    monkeypatch.undo()
    return transformer, DistributedDataParallelConfig(**kwargs), optimizer


def complete(kwargs: dict) -> dict:
    """TransformerConfig fields from keyword arguments, with the values __post_init__ derives
    (kv_channels, expert_tensor_parallel_size, ...); the fusions it would refuse without TE kept."""
    from megatron.core.transformer import TransformerConfig

    built = TransformerConfig(**{**kwargs, "apply_rope_fusion": False})
    return {**{f.name: getattr(built, f.name) for f in dataclasses.fields(TransformerConfig)},
            "apply_rope_fusion": kwargs.get("apply_rope_fusion", False)}  # fmt: skip


def differences(ours, theirs) -> dict[str, tuple]:
    def value(v):
        if isinstance(v, functools.partial):  # the init methods: the same function and arguments
            return (v.func, v.args, v.keywords)
        return False if v is None else v  # an unset switch is off

    return {name: (ours[name], theirs[name]) for name in ours if value(ours[name]) != value(theirs[name])}


LAYOUTS = {
    "tiny": (None, {}),
    "gpt2-mini": ("gpt2_slimpajama.sbatch", {"MODEL": "gpt2-mini"}),
    "gpt2-small": ("gpt2_slimpajama.sbatch", {"MODEL": "gpt2-small"}),
    "gpt2-medium": ("gpt2_slimpajama.sbatch", {"MODEL": "gpt2-medium"}),
    "llama-1.4b": ("llama1p4b_fineweb100b.sbatch", {}),
    "llama-7b": ("llama7b_fineweb175b.sbatch", {}),
}


@pytest.mark.parametrize("preset", list(LAYOUTS))
def test_configuration_equals_megatron_lms(preset, tmp_path, monkeypatch):
    script, env = LAYOUTS[preset]
    if script is None:  # the CPU demo run: torchrun --nproc-per-node 2 pretrain_llama.py
        trainer_args, world_size, on_gpu = ["--preset", "tiny", "--mock-data"], 2, False
    else:
        trainer_args, world_size, _ = sbatch_command(script, tmp_path, **env)
        on_gpu = True
    config, transformer, ddp, optimizer = our_configs(trainer_args, world_size, on_gpu, monkeypatch)
    assert config.preset == preset
    their_transformer, their_ddp, their_optimizer = megatron_lm_configs(
        pretrain_gpt_flags(config, world_size), world_size, monkeypatch
    )
    from megatron.core.optimizer import OptimizerConfig

    optimizer_fields = [f.name for f in dataclasses.fields(OptimizerConfig)]  # Megatron's is its Adam subclass
    found = {
        "transformer": differences(complete(transformer), complete(their_transformer)),
        "ddp": differences(dataclasses.asdict(ddp), dataclasses.asdict(their_ddp)),
        "optimizer": differences(
            {f: getattr(optimizer, f) for f in optimizer_fields}, {f: getattr(their_optimizer, f) for f in optimizer_fields}
        ),
    }
    for part, diff in found.items():
        intended = set(INTENDED[part]) | (set(INTENDED_ON_CPU.get(part, ())) if not on_gpu else set())
        assert set(diff) <= intended, f"{part}: unintended differences {sorted(set(diff) - intended)}: {diff}"
    if on_gpu:  # Megatron-LM's fast paths are on
        fusions = ("bias_activation_fusion", "masked_softmax_fusion", "persist_layer_norm", "apply_rope_fusion",
                   "gradient_accumulation_fusion", "bias_dropout_fusion")  # fmt: skip
        assert all(transformer[name] for name in fusions), {name: transformer[name] for name in fusions}


def test_every_intended_difference_is_documented():
    text = DOCS.read_text()
    for part in (INTENDED, INTENDED_ON_CPU):
        for fields in part.values():
            for name in fields:
                assert f"`{name}`" in text, f"docs/training.md does not list the intended difference {name}"
