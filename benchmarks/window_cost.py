"""Cost of the weighting windows on a real megatron-core training step.

The tiny preset's Llama GPTModel, megatron DDP and Adam (as benchmarks/overhead.py) time whole
training steps that differ only in how the loss is weighted:

* `plain`: Megatron-LM's pretrain_gpt.py loss, the baseline; `plain-repeat`: the same again
  (the A/A control: how finely this machine resolves a difference at all);
* `micro-batch`: LinUpper weights per micro-batch across DP (`SampleReweighter.loss_func`);
* `global-batch`: LinUpper weights over the whole global batch (`window.forward_backward`:
  a forward-only pass over the step's micro-batches first, then the forward-backward pass);
* `forward-only`: that forward-only pass alone (the schedule with forward_only=True, no
  autograd graph, no optimizer step): the measured share of a plain step that the
  global-batch window adds.

Rounds run one step of every variant in a fresh random order (the same on every rank); the
first rounds are warm-up; each variant is divided by the plain step of its round, and the
paired ratios are summarised by median, IQR and a bootstrap 95% CI. A step's time is its
slowest rank's. Run at DP=1 (4 micro-batches of 4) and DP=2 (2 micro-batches of 4 per rank).

Second, the cheap mode the issue asked about (no extra pass): the softmax denominator is one
number per window and could divide the gradient once per step, so only LinUpper's min/max
normalisation would have to come from the previous step's window (values clamped into
[-delta, delta]). The trainer trains the tiny preset on the demo corpus with one micro-batch per
step (its window is the global batch, b = 16, and again b = 128) and records every step's
losses; on them, after the r warm-up, |w_cheap - w_exact| x b per sample and the largest
w x b of each mode measure how far the cheap mode would be from the exact window.

Run:  python -m benchmarks.window_cost          (launches DP=1 and DP=2 under torchrun)
Out:  docs/results/window_cost.json and the window_cost block of docs/results.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import torch

from benchmarks.overhead import OverheadConfig, build_training, make_batches, plain_loss_func, ratio_statistics
from benchmarks.results_doc import REPO_ROOT, RESULTS_DIR, write_results_section
from megatron_reweight.launch import local_torchrun

VARIANTS = ("plain", "plain-repeat", "micro-batch", "global-batch", "forward-only")


@dataclass(frozen=True)
class WindowCostConfig:
    preset: str = "tiny"
    vocab_size: int = 4096
    strategy: str = "linupper"
    rounds: int = 40
    warmup_rounds: int = 5
    seed: int = 0
    bootstrap_samples: int = 2000
    # Cheap-mode distance: (window size b, trainer steps), the first 10 of them the r warm-up.
    cheap_mode_runs: tuple[tuple[int, int], ...] = ((16, 200), (128, 40))


def worker(cfg: WindowCostConfig, out: Path) -> None:
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_reweight import ReweightConfig, SampleReweighter, TemperatureSchedule, window

    torch.set_num_threads(1)
    model, optimizer, shape, micro_batch_size, num_microbatches = build_training(
        OverheadConfig(preset=cfg.preset, vocab_size=cfg.vocab_size, seed=cfg.seed)
    )
    seed = cfg.seed + dist.get_rank()
    batches = make_batches(shape, cfg.vocab_size, micro_batch_size, num_microbatches, seed, "cpu")
    r = 0.4  # the tiny preset's temperature after its warm-up
    reweighters = {
        name: SampleReweighter.from_parallel_state(ReweightConfig(cfg.strategy, TemperatureSchedule(r), window=name))
        for name in ("micro-batch", "global-batch")
    }
    forward_backward = get_forward_backward_func()
    schedule = {
        "model": [model],
        "num_microbatches": num_microbatches,
        "seq_length": shape.seq_length,
        "micro_batch_size": micro_batch_size,
    }

    def forward_step(loss_func, data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(loss_func, batch["loss_mask"])

    def plain_pass(forward_only: bool) -> None:
        forward_backward(forward_step_func=partial(forward_step, plain_loss_func), data_iterator=iter(batches),
                         forward_only=forward_only, **schedule)  # fmt: skip

    def plain_step() -> None:
        plain_pass(forward_only=False)
        optimizer.step()

    def reweighted_step(reweighter) -> None:
        forward_step_func = partial(forward_step, reweighter.loss_func)
        window.forward_backward(
            reweighter, forward_backward, forward_step_func=forward_step_func, data_iterator=iter(batches), **schedule
        )
        optimizer.step()

    def forward_only_pass() -> None:
        with torch.no_grad():
            plain_pass(forward_only=True)

    steps = {
        "plain": plain_step,
        "plain-repeat": plain_step,
        "micro-batch": partial(reweighted_step, reweighters["micro-batch"]),
        "global-batch": partial(reweighted_step, reweighters["global-batch"]),
        "forward-only": forward_only_pass,
    }
    order_rng = np.random.default_rng(cfg.seed)  # same seed on every rank: same order
    times = {variant: [] for variant in VARIANTS}
    for _ in range(cfg.rounds):
        for index in order_rng.permutation(len(VARIANTS)):
            variant = VARIANTS[index]
            dist.barrier()
            start = time.perf_counter()
            model.zero_grad_buffer()
            optimizer.zero_grad()
            steps[variant]()
            times[variant].append(time.perf_counter() - start)
    stacked = torch.tensor([times[v] for v in VARIANTS], dtype=torch.float64)
    dist.all_reduce(stacked, op=dist.ReduceOp.MAX)  # a step takes as long as its slowest rank
    if dist.get_rank() == 0:
        out.write_text(
            json.dumps(
                {
                    "data_parallel_size": dist.get_world_size(),
                    "micro_batch_size": micro_batch_size,
                    "num_microbatches": num_microbatches,
                    "global_batch_size": micro_batch_size * num_microbatches * dist.get_world_size(),
                    "seq_length": shape.seq_length,
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "step_times_s": {v: stacked[i, cfg.warmup_rounds :].tolist() for i, v in enumerate(VARIANTS)},
                }
            )
        )
    dist.destroy_process_group()


def summarise(cfg: WindowCostConfig, raw: dict) -> dict:
    rng = np.random.default_rng(cfg.seed)
    steps = {v: np.array(t) for v, t in raw["step_times_s"].items()}
    variants = {"plain": {"step_ms_median": 1e3 * float(np.median(steps["plain"]))}}
    for variant in VARIANTS[1:]:
        variants[variant] = {
            "step_ms_median": 1e3 * float(np.median(steps[variant])),
            "ratio_to_plain": ratio_statistics(steps[variant], steps["plain"], rng, cfg.bootstrap_samples),
        }
    # The global-batch window is the micro-batch window plus one forward-only pass.
    ratios = {variant: entry["ratio_to_plain"]["median"] for variant, entry in variants.items() if variant != "plain"}
    predicted = ratios["micro-batch"] + ratios["forward-only"]
    return {k: v for k, v in raw.items() if k != "step_times_s"} | {
        "rounds_kept": len(steps["plain"]),
        "variants": variants,
        "global_batch_predicted_ratio": predicted,
    }


def gpu_projection(runs: list[dict]) -> dict:
    """The 7B layout on GPUs: the extra pass is one forward of the step's micro-batches. A
    training step does a forward and a backward of about twice its FLOPs (no activation
    recomputation in the 7B script), so the forward is about a third of the step's compute;
    the measured CPU shares are set beside it."""
    return {
        "forward_share_by_flops": 1 / 3,
        "forward_share_measured_cpu": {
            f"DP={run['data_parallel_size']}": run["variants"]["forward-only"]["ratio_to_plain"]["median"]
            for run in runs
        },
    }


_NAMES = {
    "plain": "plain (pretrain_gpt.py loss)",
    "plain-repeat": "plain again (A/A control)",
    "micro-batch": "micro-batch window",
    "global-batch": "global-batch window",
    "forward-only": "forward-only pass alone",
}


def markdown_section(report: dict) -> str:
    runs, cfg, machine = report["runs"], report["config"], report["machine"]
    load = machine["load_average_1min_before_after"]
    first = runs[0]
    columns = [f"DP={r['data_parallel_size']} ({r['num_microbatches']} micro-batches)" for r in runs]
    lines = [
        f"Command: `{report['command']}` ({report['date']}, {report['runtime_seconds']:.0f} s on a "
        f"{machine['cpus']}-core CPU, 1 thread per rank; 1-minute load average {load[0]:.1f} before and "
        f"{load[1]:.1f} after).",
        "",
        f"Model: the `{cfg['preset']}` preset's Llama GPTModel ({first['parameters'] / 1e6:.2f}M parameters), "
        f"sequence {first['seq_length']}, global batch {first['global_batch_size']}, micro-batch "
        f"{first['micro_batch_size']}, strategy `{cfg['strategy']}`; one step = megatron-core forward-backward, DDP "
        f"gradient reduction, Adam. {first['rounds_kept']} interleaved rounds kept after {cfg['warmup_rounds']} "
        "warm-up rounds. Each cell: time / plain step of the same round, median [IQR] (95% CI of the median).",
        "",
        "| variant | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for variant in VARIANTS:
        cells = []
        for run in runs:
            entry = run["variants"][variant]
            if variant == "plain":
                cells.append(f"{entry['step_ms_median']:.1f} ms per step")
                continue
            ratio = entry["ratio_to_plain"]
            (q1, q3), (low, high) = ratio["iqr"], ratio["median_ci95"]
            cells.append(f"{ratio['median']:.3f} [{q1:.3f}, {q3:.3f}] ({low:.3f}, {high:.3f})")
        lines.append(f"| {_NAMES[variant]} | " + " | ".join(cells) + " |")
    lines.append("")
    for run in runs:
        measured = run["variants"]["global-batch"]["ratio_to_plain"]["median"]
        lines.append(
            f"DP={run['data_parallel_size']}: the global-batch window costs {measured:.3f} plain steps; the "
            f"micro-batch window plus the forward-only pass predict {run['global_batch_predicted_ratio']:.3f}."
        )
    projection = report["gpu_projection"]
    share = projection["forward_share_by_flops"]
    measured_shares = ", ".join(f"{k} {v:.2f}" for k, v in projection["forward_share_measured_cpu"].items())
    lines += [
        "",
        "On GPUs at the 7B layout (TP=2, DP=32, 4 micro-batches of 1 x 8192, no activation recomputation) the "
        f"extra pass is a forward over the step's 4 micro-batches: about {share:.2f} of a step by FLOPs (the "
        f"backward does twice the forward's), beside the forward shares measured here ({measured_shares}). "
        f"Expected: a global-batch step takes up to about {1 + share:.2f} plain steps there, less where "
        "communication, the optimizer step or a pipeline bubble take a larger part of the step.",
        "",
        "The cheap mode (LinUpper, r = 0.4, min/max of the previous step's window, exact denominator) against the "
        "exact window, on the losses of a tiny-preset run on the demo corpus, per step after the r warm-up "
        "(mean / median / worst step):",
        "",
        "| b | steps | mean over samples of \\|w_cheap - w_exact\\| x b | max over samples | exact max w x b "
        "| cheap max w x b |",
        "|---|---|---|---|---|---|",
    ]
    for run in report["cheap_mode"]:
        cells = [run[name] for name in ("mean |dw| x b", "max |dw| x b", "exact max w x b", "cheap max w x b")]
        lines.append(
            f"| {run['b']} | {run['steps']} | "
            + " | ".join(f"{c['mean']:.2f} / {c['median']:.2f} / {c['max']:.2f}" for c in cells)
            + " |"
        )
    return "\n".join(lines)


def record_windows(batch: int, steps: int, out: Path) -> None:
    """Worker: the trainer on the tiny preset and demo corpus, one micro-batch of `batch` per step
    (so each micro-batch is the whole global batch), writing each step's losses and r."""
    import megatron_reweight.training.trainer as trainer_module
    from megatron_reweight.training import parse_config, train

    windows = []

    class RecordingReweighter(trainer_module.SampleReweighter):
        def loss_func(self, loss_mask, output_tensor, domain_ids=None):
            result = super().loss_func(loss_mask, output_tensor, domain_ids)
            windows.append({"r": self.temperature(), "losses": self.last_losses.tolist()})
            return result

    trainer_module.SampleReweighter = RecordingReweighter
    torch.set_num_threads(1)
    train(parse_config([
        "--preset", "tiny", "--device", "cpu", "--reweight-strategy", "linupper", "--train-iters", str(steps),
        "--global-batch-size", str(batch), "--micro-batch-size", str(batch), "--eval-iters", "0",
        "--log-interval", "50",
    ]))  # fmt: skip
    out.write_text(json.dumps(windows))


def previous_window_linupper(losses: torch.Tensor, previous: torch.Tensor, r: float, delta: float = 1.0):
    """The cheap mode's LinUpper weights: normalised by the previous window's min and max
    (clamped into [-delta, delta]), softmax over this window."""
    low, high = previous.min(), previous.max()
    h = (delta * (2 * (losses - low) / (high - low) - 1)).clamp(-delta, delta)
    return torch.softmax(torch.clamp(h + delta, max=delta) / r, dim=0)


def cheap_mode_distance(windows: list[dict]) -> dict:
    """Per step after the r warm-up: mean and max over samples of |w_cheap - w_exact| x b, and
    each mode's largest w x b; summarised over the steps."""
    from megatron_reweight import compute_weights

    warmup_r = windows[0]["r"]
    per_step = []
    for previous, current in zip(windows, windows[1:]):
        if current["r"] == warmup_r:
            continue
        losses = torch.tensor(current["losses"], dtype=torch.float64)
        b = losses.numel()
        exact = compute_weights(losses, "linupper", r=current["r"])
        cheap = previous_window_linupper(losses, torch.tensor(previous["losses"], dtype=torch.float64), current["r"])
        gap = (cheap - exact).abs() * b
        per_step.append([gap.mean(), gap.max(), exact.max() * b, cheap.max() * b])
    table = torch.tensor(per_step)
    names = ("mean |dw| x b", "max |dw| x b", "exact max w x b", "cheap max w x b")
    return {
        "b": len(windows[0]["losses"]),
        "steps": len(per_step),
        **{name: {"mean": float(col.mean()), "median": float(col.median()), "max": float(col.max())}
           for name, col in zip(names, table.T)},
    }  # fmt: skip


def _environment() -> dict:
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")


def launch(dp_size: int, out: Path, rounds: int) -> None:
    command = local_torchrun(
        dp_size, ["-m", "benchmarks.window_cost", "--worker", "--worker-out", str(out), "--rounds", str(rounds)]
    )
    subprocess.run(command, cwd=REPO_ROOT, env=_environment(), check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "window_cost.json")
    parser.add_argument("--dp-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=WindowCostConfig.rounds)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--record-windows", type=int, nargs=2, metavar=("B", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = WindowCostConfig(rounds=args.rounds)
    if args.worker:
        worker(cfg, args.worker_out)
        return
    if args.record_windows:
        record_windows(*args.record_windows, args.worker_out)
        return

    start, load_before = time.perf_counter(), os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for dp_size in args.dp_sizes:
            out = Path(tmp) / f"dp{dp_size}.json"
            launch(dp_size, out, cfg.rounds)
            runs.append(summarise(cfg, json.loads(out.read_text())))
        cheap_mode = []
        for batch, steps in cfg.cheap_mode_runs:
            out = Path(tmp) / f"windows{batch}.json"
            command = [sys.executable, "-m", "benchmarks.window_cost", "--record-windows", str(batch), str(steps),
                       "--worker-out", str(out)]  # fmt: skip
            subprocess.run(command, cwd=REPO_ROOT, env=_environment(), check=True)
            cheap_mode.append(cheap_mode_distance(json.loads(out.read_text())))
    report = {
        "benchmark": "window_cost",
        "command": "python -m benchmarks.window_cost"
        + ("" if args.rounds == WindowCostConfig.rounds else f" --rounds {args.rounds}"),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "device": "cpu",
                    "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]]},  # fmt: skip
        "runtime_seconds": round(time.perf_counter() - start, 1),
        "config": asdict(cfg),
        "runs": runs,
        "cheap_mode": cheap_mode,
    }
    report["gpu_projection"] = gpu_projection(runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    if args.out.resolve().parent == RESULTS_DIR:
        write_results_section("window_cost", markdown_section(report), "window_cost")
    print(markdown_section(report))


if __name__ == "__main__":
    main()
