"""A small language model on several domains, per strategy (paper 1, Table 1, Figures 2 and 6;
paper 2, Figure 2).

Each strategy trains the same model from the same initialisation on the same data in the
same order (same seed, Megatron's sequential sampler) through the project's trainer, on
the offline multi-domain demo corpus. We record
* per-domain validation perplexity over training (the trainer's evaluation);
* every training sample's loss, weight and domain, from which: the largest weight per
  step times the batch size against Theorem 1's bound 2 (paper 1, Figure 6), the
  distribution of weights (paper 2, Figure 2) and the mean weight x b per domain.

The trainer logs each domain's mean weight but not per-sample weights, so each run happens
in a worker process that subclasses the trainer's `SampleReweighter` to record every
micro-batch's losses, weights and domain ids.

One micro-batch per step (micro-batch = global batch = 16), so each step's weights span
the whole batch, as in paper 1 where the losses of all GPUs are gathered.

Run:  python -m benchmarks.tiny_lm_domains        (about 8 min on 2 CPU cores, more when busy)
Out:  docs/results/tiny_lm_domains.json, tiny_lm_domains_ppl.png, tiny_lm_domains_weights.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks.results_doc import REPO_ROOT, RESULTS_DIR, write_results_section

LABELS = {
    "uniform": "Uniform",
    "linupper": "LinUpper",
    "quadratic": "Quadratic",
    "extremes": "Extremes",
    "capped": "Capped",
    "irdro": "IR-DRO",
}
COLORS = {
    "uniform": "black",
    "linupper": "tab:blue",
    "quadratic": "tab:green",
    "extremes": "tab:orange",
    "capped": "tab:purple",
    "irdro": "tab:red",
}


@dataclass(frozen=True)
class LMConfig:
    preset: str = "tiny"
    strategies: tuple[str, ...] = ("uniform", "linupper", "quadratic", "extremes")
    train_iters: int = 200  # the tiny preset's
    global_batch_size: int = 16
    micro_batch_size: int = 16  # one micro-batch per step: weights span the whole batch
    eval_interval: int = 20
    eval_iters: int = 4  # global batches per domain and evaluation: 64 sequences, 8k tokens
    seed: int = 1234
    threads: int = 2
    # None: the preset's (tiny: r = 0.4 after r = 100 for the first 10 steps, as paper 1's GPT-2 runs).
    reweight_r: float | None = None
    reweight_r_warmup_steps: int | None = None
    extra_args: tuple[str, ...] = ()  # any other pretrain_llama.py flags, e.g. a larger shape

    def trainer_args(self, strategy: str, metrics_file: Path) -> list[str]:
        args = [
            "--preset", self.preset, "--device", "cpu",
            "--train-iters", str(self.train_iters),
            "--global-batch-size", str(self.global_batch_size), "--micro-batch-size", str(self.micro_batch_size),
            "--eval-interval", str(self.eval_interval), "--eval-iters", str(self.eval_iters),
            "--log-interval", "1", "--seed", str(self.seed),
            "--reweight-strategy", strategy, "--metrics-file", str(metrics_file),
        ]  # fmt: skip
        if self.reweight_r is not None:
            args += ["--reweight-r", str(self.reweight_r)]
        if self.reweight_r_warmup_steps is not None:
            args += ["--reweight-r-warmup-steps", str(self.reweight_r_warmup_steps)]
        return args + list(self.extra_args)


# --- worker: one training run, with the per-sample record ---------------------------------


def worker(cfg: LMConfig, strategy: str, out: Path) -> None:
    import torch

    torch.set_num_threads(cfg.threads)
    import megatron_reweight.training.trainer as trainer_module
    from megatron_reweight.training import parse_config, train

    samples: list[dict] = []

    class RecordingReweighter(trainer_module.SampleReweighter):
        def loss_func(self, loss_mask, output_tensor, domain_ids=None):
            result = super().loss_func(loss_mask, output_tensor, domain_ids)
            samples.append(
                {
                    "step": self.step,
                    "r": self.temperature(),
                    "losses": self.last_losses.tolist(),
                    "weights": self.last_weights.tolist(),
                    "domain_ids": domain_ids.tolist(),  # one process: the whole gathered batch
                }
            )
            return result

    trainer_module.SampleReweighter = RecordingReweighter

    metrics_file = out.with_suffix(".jsonl")
    config = parse_config(cfg.trainer_args(strategy, metrics_file))
    start = time.perf_counter()
    result = train(config)
    runtime = time.perf_counter() - start
    run_record = next(json.loads(line) for line in metrics_file.read_text().splitlines() if '"kind": "run"' in line)
    out.write_text(
        json.dumps(
            {
                "strategy": strategy,
                "runtime_seconds": runtime,
                "domains": list(config.data.domains),
                "parameters": run_record["parameters"],
                "run": {
                    k: run_record[k]
                    for k in (
                        "preset",
                        "seq_length",
                        "global_batch_size",
                        "micro_batch_size",
                        "num_microbatches",
                        "padded_vocab_size",
                        "reweight",
                    )
                },
                "train_history": result.train_history,
                "eval_history": result.eval_history,
                "samples": samples,
            }
        )
    )


# --- parent: run every strategy, analyse, plot ---------------------------------------------


def run_strategy(cfg: LMConfig, strategy: str, tmp: Path) -> dict:
    out = tmp / f"{strategy}.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    env["OMP_NUM_THREADS"] = str(cfg.threads)
    command = [
        sys.executable,
        "-m",
        "benchmarks.tiny_lm_domains",
        "--worker",
        strategy,
        "--worker-out",
        str(out),
        "--worker-config",
        json.dumps(asdict(cfg)),
    ]
    subprocess.run(command, cwd=REPO_ROOT, env=env, check=True)
    return json.loads(out.read_text())


def linupper_ceiling(batch: int, r: float, delta: float = 1.0) -> float:
    """LinUpper's largest possible max_i w_i x b: one sample at the top of the loss range
    (s = delta), the other b - 1 at the bottom (s = 0)."""
    top = math.exp(delta / r)
    return batch * top / (top + batch - 1)


# Paper 1's settings (Table 7: minibatch size b and r), to set our ceiling beside theirs.
PAPER_SETTINGS = {
    "GPT-2 (b=32, r=0.4)": (32, 0.4),
    "Llama 1.4B (b=128, r=1)": (128, 1.0),
    "Llama 7B (b=128, r=2)": (128, 2.0),
}


def analyse(cfg: LMConfig, runs: dict[str, dict]) -> dict:
    domains = next(iter(runs.values()))["domains"]
    table, curves, weights = {}, {}, {}
    # One set of histogram bins for all strategies, wide enough for the largest weight seen.
    largest = max(max(max(s["weights"]) * len(s["weights"]) for s in run["samples"]) for run in runs.values())
    histogram_edges = np.arange(0.0, math.ceil(max(largest, 2.0) * 10) / 10 + 0.05, 0.05)
    for strategy, run in runs.items():
        final = run["eval_history"][-1]["domains"]
        ppl = {d: final[d]["ppl"] for d in domains}
        table[strategy] = {
            "iteration": run["eval_history"][-1]["iteration"],
            "ppl": ppl,
            "loss": {d: final[d]["loss"] for d in domains},
            "mean_ppl": float(np.mean(list(ppl.values()))),  # Table 1's "Mean": the mean over domains
        }
        curves[strategy] = {
            "iterations": [e["iteration"] for e in run["eval_history"]],
            "ppl": {d: [e["domains"][d]["ppl"] for e in run["eval_history"]] for d in domains},
            "train_lm_loss": [h.get("lm loss") for h in run["train_history"]],
        }

        # Weight diagnostics after the temperature warm-up (before it, r = 100: uniform).
        warmup_r = run["run"]["reweight"]["warmup_r"]
        kept = [s for s in run["samples"] if s["r"] != warmup_r]
        b = len(kept[0]["weights"])
        w_times_b = np.concatenate([np.asarray(s["weights"]) * b for s in kept])
        losses = np.concatenate([np.asarray(s["losses"]) for s in kept])
        domain_ids = np.concatenate([np.asarray(s["domain_ids"]) for s in kept])
        max_per_step = np.array([max(s["weights"]) * b for s in kept])
        r = kept[0]["r"]
        delta = run["run"]["reweight"]["delta"]
        per_domain = {}
        for index, name in enumerate(domains):
            mask = domain_ids == index
            per_domain[name] = {
                "samples": int(mask.sum()),
                "mean_weight_x_b": float(w_times_b[mask].mean()) if mask.any() else None,
                "mean_sample_loss": float(losses[mask].mean()) if mask.any() else None,
            }
        counts, _ = np.histogram(w_times_b, bins=histogram_edges)
        weights[strategy] = {
            "batch_size": b,
            "r": r,
            "steps_kept": len(kept),
            "max_weight_x_b_per_step": max_per_step.round(5).tolist(),
            "max_weight_x_b_max": float(max_per_step.max()),
            "max_weight_x_b_median": float(np.median(max_per_step)),
            "steps_over_bound_2": int((max_per_step > 2.0).sum()),
            # LinUpper's largest possible max w x b: one sample at s = delta, the other b-1 at 0.
            "linupper_ceiling": linupper_ceiling(b, r, delta),
            "weight_x_b_histogram": {"edges": histogram_edges.tolist(), "counts": counts.tolist()},
            "min_weight_x_b": float(w_times_b.min()),
            "effective_sample_fraction_mean": float(np.mean([1.0 / (np.square(s["weights"]).sum() * b) for s in kept])),
            "per_domain": per_domain,
        }
    paper_ceilings = {name: linupper_ceiling(b, r) for name, (b, r) in PAPER_SETTINGS.items()}
    return {
        "domains": domains,
        "final_table": table,
        "curves": curves,
        "weights": weights,
        "linupper_ceiling_at_paper_settings": paper_ceilings,
    }


def plot(cfg: LMConfig, analysis: dict, out_dir: Path, name: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains, strategies = analysis["domains"], list(analysis["curves"])

    # Per-domain validation perplexity against iteration (paper 1, Figures 2-4).
    columns = min(4, len(domains))
    rows = math.ceil(len(domains) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    for ax, domain in zip(axes.flat, domains):
        for strategy in strategies:
            curve = analysis["curves"][strategy]
            ax.plot(
                curve["iterations"],
                curve["ppl"][domain],
                color=COLORS.get(strategy),
                label=LABELS.get(strategy, strategy),
            )
        ax.set(title=domain, xlabel="iteration", ylabel="validation ppl", yscale="log")
    for ax in list(axes.flat)[len(domains) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{name}: per-domain validation perplexity (same seed and data order)")
    fig.tight_layout()
    ppl_png = out_dir / f"{name}_ppl.png"
    fig.savefig(ppl_png, dpi=100)
    plt.close(fig)

    # Weight diagnostics.
    reweighted = [s for s in strategies if s != "uniform"]
    fig, (ax_max, ax_hist, ax_domain) = plt.subplots(1, 3, figsize=(17, 4.6))
    for strategy in reweighted:
        w = analysis["weights"][strategy]
        edges = np.array(w["weight_x_b_histogram"]["edges"])
        ax_max.hist(
            w["max_weight_x_b_per_step"],
            bins=edges[edges >= 1.0],
            alpha=0.5,
            color=COLORS.get(strategy),
            label=LABELS.get(strategy, strategy),
        )
    w0 = analysis["weights"][reweighted[0]]
    ax_max.axvline(2.0, color="red", ls="--", label="Theorem 1 bound: 2")
    ax_max.axvline(
        w0["linupper_ceiling"],
        color="gray",
        ls=":",
        label=f"LinUpper ceiling b e^(δ/r)/(e^(δ/r)+b-1) = {w0['linupper_ceiling']:.2f}",
    )
    ax_max.set(
        xlabel="max weight × batch size, per step",
        ylabel="steps",
        title=f"Largest weight per step (b={w0['batch_size']}, r={w0['r']:g})",
    )
    ax_max.legend(fontsize=7.5)

    for strategy in reweighted:
        hist = analysis["weights"][strategy]["weight_x_b_histogram"]
        edges, counts = np.array(hist["edges"]), np.array(hist["counts"])
        ax_hist.stairs(counts / counts.sum(), edges, color=COLORS.get(strategy), label=LABELS.get(strategy, strategy))
    ax_hist.axvline(1.0, color="gray", lw=0.8)
    ax_hist.set(
        xlabel="weight × batch size (1 = uniform)",
        ylabel="fraction of samples",
        title="Distribution of weights (after r warm-up)",
    )
    ax_cumulative = ax_hist.twinx()
    for strategy in reweighted:
        hist = analysis["weights"][strategy]["weight_x_b_histogram"]
        counts = np.array(hist["counts"])
        ax_cumulative.plot(hist["edges"][1:], np.cumsum(counts) / counts.sum(), ls=":", color=COLORS.get(strategy))
    ax_cumulative.set(ylabel="cumulative fraction (dotted)", ylim=(0, 1.02))
    ax_hist.legend(fontsize=8)

    width = 0.8 / len(reweighted)
    positions = np.arange(len(domains))
    for i, strategy in enumerate(reweighted):
        per_domain = analysis["weights"][strategy]["per_domain"]
        values = [per_domain[d]["mean_weight_x_b"] or 0.0 for d in domains]
        ax_domain.bar(
            positions + (i - (len(reweighted) - 1) / 2) * width,
            values,
            width,
            color=COLORS.get(strategy),
            label=LABELS.get(strategy, strategy),
        )
    ax_domain.axhline(1.0, color="gray", lw=0.8)
    ax_domain.set_xticks(positions, domains, rotation=30, ha="right")
    ax_domain.set(ylabel="mean weight × batch size", title="Which domains are down-weighted (< 1)")
    ax_domain.legend(fontsize=8)
    fig.tight_layout()
    weights_png = out_dir / f"{name}_weights.png"
    fig.savefig(weights_png, dpi=100)
    plt.close(fig)
    return [ppl_png.name, weights_png.name]


def markdown_section(report: dict) -> str:
    """This benchmark's block of docs/results.md, every number from `report`."""
    cfg, model, domains = report["config"], report["model"], report["domains"]
    table, weights = report["final_table"], report["weights"]
    reweight = model["reweight"]
    reweighted = [s for s in table if s != "uniform"]
    first = weights[reweighted[0]] if reweighted else None
    lines = [
        f"Command: `{report['command']}` ({report['date']}, {report['runtime_seconds']:.0f} s on a {report['machine']['cpus']}-core CPU; "
        + ", ".join(f"{s} {t:.0f} s" for s, t in report["run_seconds"].items())
        + ").",
        "",
        (
            f"Model: `{model['preset']}` preset, {model['parameters'] / 1e6:.2f}M parameters, sequence {model['seq_length']}, vocabulary "
            f"{model['padded_vocab_size']}; {cfg['train_iters']} steps of {model['global_batch_size']} sequences "
            f"({cfg['train_iters'] * model['global_batch_size'] * model['seq_length'] / 1e6:.2f}M tokens) in {model['num_microbatches']} "
            f"micro-batch per step; the preset's LR schedule; r = {reweight['warmup_r']:g} for the first {reweight['warmup_steps']} steps, "
            f"then r = {reweight['r']:g}, delta = {reweight['delta']:g}; seed {cfg['seed']} for every strategy (same initialisation and data order). "
            f"Validation: the first {cfg['eval_iters']} global batches of each domain's held-out split, every {cfg['eval_interval']} steps."
        ),
        "",
        f"![Per-domain validation perplexity]({'results/' + report['plots'][0]})",
        "",
        f"Final validation perplexity (step {next(iter(table.values()))['iteration']}; lowest per column in bold; mean = mean over domains, as Table 1):",
        "",
        "| strategy | " + " | ".join(domains) + " | mean |",
        "|---|" + "---|" * (len(domains) + 1),
    ]
    best = {d: min(row["ppl"][d] for row in table.values()) for d in domains}
    best_mean = min(row["mean_ppl"] for row in table.values())

    def cell(value: float, lowest: float) -> str:
        return f"**{value:.2f}**" if value == lowest else f"{value:.2f}"

    for strategy, row in table.items():
        lines.append(
            f"| {LABELS.get(strategy, strategy)} | "
            + " | ".join(cell(row["ppl"][d], best[d]) for d in domains)
            + f" | {cell(row['mean_ppl'], best_mean)} |"
        )
    if "uniform" in table:
        lines += [
            "",
            "Relative to Uniform (perplexity ratio, < 1 is better):",
            "",
            "| strategy | " + " | ".join(domains) + " | mean |",
            "|---|" + "---|" * (len(domains) + 1),
        ]
        base = table["uniform"]
        for strategy in reweighted:
            row = table[strategy]
            lines.append(
                f"| {LABELS.get(strategy, strategy)} | "
                + " | ".join(f"{row['ppl'][d] / base['ppl'][d]:.3f}" for d in domains)
                + f" | {row['mean_ppl'] / base['mean_ppl']:.3f} |"
            )
    if first is not None:
        lines += [
            "",
            f"![Weight diagnostics]({'results/' + report['plots'][1]})",
            "",
            (
                f"Weights after the r warm-up ({first['steps_kept']} steps, b = {first['batch_size']} samples per weighting, r = {first['r']:g}). "
                f"Mean weight x b per domain (1 = uniform; < 1: down-weighted), with the domain's mean training-sample loss in that run:"
            ),
            "",
            "| strategy | "
            + " | ".join(domains)
            + " | max w·b per step: median / max | steps with max w·b > 2 | effective sample fraction |",
            "|---|" + "---|" * (len(domains) + 3),
        ]
        for strategy in reweighted:
            w = weights[strategy]
            cells = []
            for d in domains:
                v = w["per_domain"][d]
                cells.append(
                    "-"
                    if v["mean_weight_x_b"] is None
                    else f"{v['mean_weight_x_b']:.2f} (loss {v['mean_sample_loss']:.2f})"
                )
            lines.append(
                f"| {LABELS.get(strategy, strategy)} | "
                + " | ".join(cells)
                + f" | {w['max_weight_x_b_median']:.2f} / {w['max_weight_x_b_max']:.2f} | {w['steps_over_bound_2']} of {w['steps_kept']} "
                f"| {w['effective_sample_fraction_mean']:.2f} |"
            )
        lines += [
            "",
            (
                f"LinUpper's largest possible max w·b at this b and r (one sample at the top of the range, all others at the bottom) is "
                f"b e^(delta/r) / (e^(delta/r) + b - 1) = {first['linupper_ceiling']:.2f}; Theorem 1 asks for at most 2. "
                "At paper 1's settings (delta = 1): "
                + ", ".join(
                    f"{name} {value:.2f}" for name, value in report["linupper_ceiling_at_paper_settings"].items()
                )
                + "."
            ),
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--train-iters", type=int, default=LMConfig.train_iters)
    parser.add_argument("--strategies", nargs="+", default=list(LMConfig.strategies))
    parser.add_argument("--name", default="tiny_lm_domains", help="output file stem")
    parser.add_argument("--extra-args", default="", help="more pretrain_llama.py flags, quoted, e.g. a larger shape")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-config", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        fields = json.loads(args.worker_config)
        cfg = LMConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        worker(cfg, args.worker, args.worker_out)
        return

    cfg = LMConfig(
        train_iters=args.train_iters, strategies=tuple(args.strategies), extra_args=tuple(args.extra_args.split())
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for strategy in cfg.strategies:
            print(f"training {strategy} ...", flush=True)
            runs[strategy] = run_strategy(cfg, strategy, Path(tmp))
    analysis = analyse(cfg, runs)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot(cfg, analysis, args.out_dir, args.name)
    first = next(iter(runs.values()))
    command = "python -m benchmarks.tiny_lm_domains"
    if args.train_iters != LMConfig.train_iters:
        command += f" --train-iters {args.train_iters}"
    if tuple(args.strategies) != LMConfig.strategies:
        command += " --strategies " + " ".join(args.strategies)
    if args.name != "tiny_lm_domains":
        command += f" --name {args.name}"
    if args.extra_args:
        command += f" --extra-args '{args.extra_args}'"
    report = {
        "benchmark": args.name,
        "command": command,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "device": "cpu"},
        "runtime_seconds": round(time.perf_counter() - start, 1),
        "run_seconds": {s: round(r["runtime_seconds"], 1) for s, r in runs.items()},
        "config": asdict(cfg),
        "model": {"parameters": first["parameters"], **first["run"]},
        "plots": plots,
        **analysis,
    }
    path = args.out_dir / f"{args.name}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    if args.out_dir.resolve() == RESULTS_DIR:
        write_results_section(args.name, markdown_section(report), "tiny_lm_domains")

    domains = analysis["domains"]
    print(f"{'':10s}" + "".join(f"{d[:10]:>11s}" for d in domains) + f"{'mean':>11s}")
    for strategy, row in analysis["final_table"].items():
        print(f"{strategy:10s}" + "".join(f"{row['ppl'][d]:11.2f}" for d in domains) + f"{row['mean_ppl']:11.2f}")
    for strategy, w in analysis["weights"].items():
        per_domain = ", ".join(
            f"{d} {v['mean_weight_x_b']:.3f}" for d, v in w["per_domain"].items() if v["mean_weight_x_b"] is not None
        )
        print(
            f"{strategy:10s} max w*b {w['max_weight_x_b_max']:.3f} (median {w['max_weight_x_b_median']:.3f}, {w['steps_over_bound_2']} steps > 2) | mean w*b per domain: {per_domain}"
        )
    print(f"wrote {path} and {', '.join(plots)} in {report['runtime_seconds']} s")


if __name__ == "__main__":
    main()
