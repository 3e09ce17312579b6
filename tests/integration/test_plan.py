"""The layout planner (megatron_reweight/plan.py): its memory estimate is Megatron-LM's own
theoretical_memory_usage.py (called here from MEGATRON_LM_PATH on the same layouts' arguments),
the recomputation it plans is the least that fits, and its recommendation is the cheapest."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from megatron_reweight.plan import GIB, Layout, activation_memory, estimate, memory_args, plan, weight_and_optimizer_memory
from megatron_reweight.training.config import preset_config
from tests.helpers import REPO
from tests.helpers.megatron_lm import AVAILABLE, REASON, llama_flags, megatron_lm_args

MIB = 1024**2

# (preset, layout, distributed optimizer): each branch of Megatron-LM's formula.
MEGATRON_LAYOUTS = [
    # Sequence parallelism with selective recomputation: compute_activation_memory.
    ("llama-7b", Layout(tp=2, pp=1, cp=1, dp=32, micro_batch=4, num_microbatches=1), True),
    # No model parallelism: compute_activation_memory_without_sp, the output layer on the stage.
    ("llama-1.4b", Layout(tp=1, pp=1, cp=1, dp=64, micro_batch=2, num_microbatches=1), False),
    # Pipeline parallelism with fewer micro-batches than stages, and without sequence parallelism.
    ("llama-7b", Layout(tp=2, pp=4, cp=1, dp=8, micro_batch=1, num_microbatches=2), True),
    # Pipeline and sequence parallelism, a GPT-2 vocabulary.
    ("gpt2-medium", Layout(tp=2, pp=2, cp=1, dp=4, micro_batch=2, num_microbatches=6), True),
]


@pytest.mark.skipif(not AVAILABLE, reason=REASON)
@pytest.mark.parametrize("preset, layout, distributed_optimizer", MEGATRON_LAYOUTS)
def test_memory_estimate_is_megatron_lms(preset, layout, distributed_optimizer, monkeypatch):
    shape = preset_config(preset).model
    vocab = 50257 if preset.startswith("gpt2") else 32000
    global_batch = layout.dp * layout.micro_batch * layout.num_microbatches
    flags = llama_flags(shape, micro_batch=layout.micro_batch, global_batch=global_batch, vocab_size=vocab) + [
        "--tensor-model-parallel-size", str(layout.tp), "--pipeline-model-parallel-size", str(layout.pp),
    ]  # fmt: skip
    ours = memory_args(shape, vocab, layout)
    if distributed_optimizer:
        flags.append("--use-distributed-optimizer")
    else:
        ours = dataclasses.replace(ours, use_distributed_optimizer=False)
    if layout.pp == 4:  # the branch without sequence parallelism, at TP 2
        ours = dataclasses.replace(ours, sequence_parallel=False, recompute_granularity=None)
    elif layout.sequence_parallel:
        flags += ["--sequence-parallel", "--recompute-activations"]
    args = megatron_lm_args(flags, layout.tp * layout.pp * layout.dp, monkeypatch)
    from megatron.training.theoretical_memory_usage import report_theoretical_memory
    from megatron.training.tokenizer.tokenizer import _vocab_size_with_padding

    args.padded_vocab_size = _vocab_size_with_padding(vocab, args)
    weights_mb, activations_mb, _ = report_theoretical_memory(args, num_microbatches=layout.num_microbatches)
    monkeypatch.undo()
    assert ours.padded_vocab_size == args.padded_vocab_size
    assert weight_and_optimizer_memory(ours) / MIB == pytest.approx(weights_mb, rel=1e-12)
    assert activation_memory(ours, layout.num_microbatches) / MIB == pytest.approx(activations_mb, rel=1e-12)


def test_the_recommended_7b_layout_on_8_h100_nodes():
    shape = preset_config("llama-7b").model
    estimates = plan(shape, 32000, 128, gpus=64, gpu_memory_gib=80)
    budget = 0.85 * 80 * GIB
    assert estimates and all(e.memory <= budget for e in estimates)
    assert [e.cost for e in estimates] == sorted(e.cost for e in estimates)
    best = estimates[0]
    assert (best.layout.tp, best.layout.dp, best.layout.micro_batch, best.window_is_free) == (2, 32, 4, True)
    # The least recomputation that fits: one layer fewer does not.
    n = best.layout.recompute_layers
    assert 0 < n < shape.num_layers
    assert estimate(shape, 32000, dataclasses.replace(best.layout, recompute_layers=n - 1)).memory > budget
    # Each recomputed layer keeps only its input: memory falls and the step costs a third of a layer more.
    fewer = estimate(shape, 32000, dataclasses.replace(best.layout, recompute_layers=n - 1))
    assert best.activations < fewer.activations
    assert best.recompute_share - fewer.recompute_share == pytest.approx(1 / 3 / shape.num_layers, rel=0.05)
    # The layout with 4 micro-batches per step pays the forward-only pass: a third of a step.
    accumulating = next(e for e in estimates if e.layout.tp == 2 and e.layout.micro_batch == 1 and e.layout.cp == 1)
    assert not accumulating.window_is_free and accumulating.extra_pass_share == pytest.approx(1 / 3)
    assert accumulating.cost > best.cost


def test_more_memory_needs_no_recomputation():
    shape = preset_config("llama-7b").model
    for gpus, memory in ((128, 80), (64, 141)):
        best = plan(shape, 32000, 128, gpus=gpus, gpu_memory_gib=memory)[0]
        assert best.layout.recompute_layers == 0 and best.window_is_free


def test_plan_command_prints_the_table_and_the_recommendation():
    result = subprocess.run(
        [sys.executable, "-m", "megatron_reweight.plan", "--preset", "llama-7b", "--gpus", "64", "--gpu-memory", "80",
         "--top", "3"], cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "| 2 +SP | 1 | 1 | 32 | 4 | 1 |" in result.stdout
    assert "recommended: --tensor-model-parallel-size 2" in result.stdout and "--recompute-method block" in result.stdout


# (script, LAYOUT, GPUs, GiB per GPU): each sbatch layout knob and the machine it is for.
SBATCH_LAYOUTS = [
    ("llama7b_fineweb175b.sbatch", "h100x8", 64, 80),
    ("llama7b_fineweb175b.sbatch", "h100x16", 128, 80),
    ("llama7b_fineweb175b.sbatch", "h200x8", 64, 141),
    ("llama1p4b_fineweb100b.sbatch", "h100x8", 64, 80),
    ("llama1p4b_fineweb100b.sbatch", "h100x16", 128, 80),
    ("llama1p4b_fineweb100b.sbatch", "h200x8", 64, 141),
]


@pytest.mark.parametrize("script, layout, gpus, memory", SBATCH_LAYOUTS)
def test_sbatch_scripts_run_the_planners_choice(script, layout, gpus, memory, tmp_path):
    """The script's layout is the planner's recommendation, and its time estimate uses the plan's step cost."""
    from megatron_reweight.training.arguments import build_parser, settings_from_args
    from tests.helpers.sbatch import sbatch_command

    trainer_args, world_size, output = sbatch_command(script, tmp_path, LAYOUT=layout, SLURM_NNODES=str(gpus // 8))
    assert world_size == gpus
    config = settings_from_args(build_parser().parse_args(trainer_args))
    best = plan(config.model, 32000, config.optim.global_batch_size, gpus=gpus, gpu_memory_gib=memory)[0]
    p = config.parallel
    recompute = p.recompute_num_layers if p.recompute_granularity == "full" and p.recompute_method == "block" else 0
    ran = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size,
           config.optim.micro_batch_size, recompute, p.sequence_parallel)  # fmt: skip
    planned = best.layout
    assert ran == (planned.tp, planned.pp, planned.cp, planned.micro_batch, planned.recompute_layers,
                   planned.sequence_parallel)  # fmt: skip
    assert p.use_distributed_optimizer and p.overlap_grad_reduce and p.overlap_param_gather
    assert config.reweight.window == "global-batch" and best.window_is_free
    assert f"step cost {best.cost:.3f} x an ideal step" in output
