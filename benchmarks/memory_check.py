"""The planner's estimates on one GPU: peak memory of a few layers of a preset's shape at the
planner's micro-batch against megatron_reweight/plan.py's estimate for the same one-GPU layout,
without and with block recomputation of one layer, and the step time with Megatron-LM's fusions
on and off.

Each run is pretrain_llama.py's `train()` in its own process (mock data, one micro-batch per
step, the distributed optimizer), which reports torch.cuda.max_memory_allocated (what the
estimate models) and max_memory_reserved (what the allocator held) after the run.

    python -m benchmarks.memory_check --device cuda --out memory.json        # llama-1.4b and llama-7b, 2 layers
    python -m benchmarks.memory_check --device cpu --presets tiny --steps 3  # the plumbing, no memory figures
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.results_doc import REPO_ROOT as REPO

# The layout the planner recommends for the paper's runs: 8 nodes of H100-80GB.
PLANNED_GPUS, PLANNED_GIB = 64, 80


def planned_micro_batch(preset: str) -> int:
    from megatron_reweight.plan import VOCAB, plan
    from megatron_reweight.training.config import preset_config

    config = preset_config(preset)
    estimates = plan(config.model, VOCAB[preset], config.optim.global_batch_size, PLANNED_GPUS, PLANNED_GIB)
    return estimates[0].layout.micro_batch if estimates else config.optim.micro_batch_size


def worker(flags: list[str]) -> None:
    """One run: train, then print the peak memory and step times as one JSON line."""
    import torch

    from megatron_reweight.training import parse_config, train

    result = train(parse_config(flags))
    cuda = torch.cuda.is_available()
    print("MEMORY_CHECK " + json.dumps({
        "peak_allocated": torch.cuda.max_memory_allocated() if cuda else None,
        "peak_reserved": torch.cuda.max_memory_reserved() if cuda else None,
        "step_times": [record["step time s"] for record in result.train_history],
    }))  # fmt: skip


def run(flags: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory_check", "--worker", *flags],
        cwd=REPO, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"run failed: {' '.join(flags)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith("MEMORY_CHECK "))
    return json.loads(line.removeprefix("MEMORY_CHECK "))


def check(preset: str, args) -> dict:
    from megatron_reweight.model import FUSIONS
    from megatron_reweight.plan import GIB, VOCAB, Layout, estimate
    from megatron_reweight.training.config import preset_config

    micro_batch = planned_micro_batch(preset)
    shape = preset_config(preset).model
    shape.num_layers = args.layers
    if args.seq_length:
        shape.seq_length = args.seq_length
    vocab = VOCAB[preset]
    base = [
        "--preset", preset, "--mock-data", "--vocab-size", str(vocab), "--num-layers", str(args.layers),
        "--seq-length", str(shape.seq_length), "--max-position-embeddings", str(shape.seq_length),
        "--micro-batch-size", str(micro_batch), "--global-batch-size", str(micro_batch),
        "--train-iters", str(args.steps), "--log-interval", "1", "--eval-iters", "0", "--device", args.device,
        "--use-distributed-optimizer", "--lr-warmup-iters", "1", "--reweight-window", "global-batch",
    ]  # fmt: skip
    no_fusions = ["--no-" + name.replace("_", "-") for name in FUSIONS]
    recompute_one = ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1"]
    runs = {"fusions on": (base, 0), "fusions off": (base + no_fusions, 0), "fusions on, 1 layer recomputed": (
        base + recompute_one, 1)}  # fmt: skip
    report = {"preset": preset, "layers": args.layers, "seq_length": shape.seq_length, "micro_batch": micro_batch,
              "runs": {}}  # fmt: skip
    for name, (flags, recomputed) in runs.items():
        measured = run(flags)
        planned = estimate(shape, vocab, Layout(1, 1, 1, 1, micro_batch, 1, recomputed))
        steps = measured["step_times"][args.skip :] or measured["step_times"]
        entry = {
            "estimate_gib": planned.memory / GIB,
            "step_time_median_s": statistics.median(steps),
            "peak_allocated_gib": None, "peak_reserved_gib": None, "allocated_over_estimate": None,
        }  # fmt: skip
        if measured["peak_allocated"] is not None:
            entry["peak_allocated_gib"] = measured["peak_allocated"] / GIB
            entry["peak_reserved_gib"] = measured["peak_reserved"] / GIB
            entry["allocated_over_estimate"] = measured["peak_allocated"] / planned.memory
        report["runs"][name] = entry
    runs_ = report["runs"]
    report["fusion_speedup"] = runs_["fusions off"]["step_time_median_s"] / runs_["fusions on"]["step_time_median_s"]
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--presets", nargs="+", default=["llama-1.4b", "llama-7b"])
    parser.add_argument("--layers", type=int, default=2, help="transformer layers of the preset's shape")
    parser.add_argument("--seq-length", type=int, help="default: the preset's")
    parser.add_argument("--steps", type=int, default=8, help="steps per run")
    parser.add_argument("--skip", type=int, default=3, help="first steps left out of the step time")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    reports = [check(preset, args) for preset in args.presets]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": args.device, "checks": reports}, indent=2) + "\n")
    for report in reports:
        print(f"{report['preset']}: {report['layers']} layers, micro-batch {report['micro_batch']} x "
              f"{report['seq_length']} tokens; fusions: {report['fusion_speedup']:.2f}x faster")  # fmt: skip
        for name, entry in report["runs"].items():
            peak = entry["peak_allocated_gib"]
            measured = f"peak {peak:.2f} GiB allocated ({entry['allocated_over_estimate']:.2f} x the estimate), " \
                f"{entry['peak_reserved_gib']:.2f} GiB reserved" if peak is not None else "no GPU memory figures"
            print(f"  {name}: estimate {entry['estimate_gib']:.2f} GiB, {measured}, step "
                  f"{entry['step_time_median_s'] * 1e3:.1f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
