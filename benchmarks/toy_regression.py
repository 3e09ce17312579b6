"""Toy regression with outliers (paper 1, Appendix B; Figures 7 and 8).

A linear model is fitted by minibatch SGD to n clean points plus m outliers and
evaluated on held-out clean points. Every strategy weights each minibatch with
`megatron_reweight.compute_weights`, the same function the Megatron loss uses.

Data (Appendix B.1):
    clean    x ~ N(0, I_p),            y = x . W* + b* + c eps,   eps ~ N(0, 1)
    outlier  x ~ 0.1 N(0, I_p) + 2,    y ~ N(0, 1)
    loss     l_i = 0.5 (x_i . w + b - y_i)^2
with p = 64, n = 3200, m = 800 (20% of the training set), c = 0.1. The paper does not give
the scale of W* and b*; we draw them from N(0, 1), so a clean point starts (w = 0) with a loss
of about |W*|^2 / 2 ~ p / 2 while an outlier starts near 0.5.

Optimiser: plain minibatch SGD, w <- w - lr sum_i w_i grad l_i, from w = 0, b = 0.
* batch size 32: the paper's GPT2-mini minibatch (Table 7); small enough that the
  softmax weights of Eq. (4) vary from batch to batch.
* shared learning rate 0.01: about a quarter of the full-batch stability limit
  2 / lambda_max. The Hessian's largest eigenvalue comes from the outliers,
  lambda_max ~ 0.2 (4 p + 1) ~ 51, so uniform SGD is stable up to ~0.04.
  A single outlier has curvature |x|^2 + 1 ~ 4 p + 1 = 257, so an update that puts
  (nearly) all weight on one outlier is stable only for lr < 2 / 257 ~ 0.008:
  that is why KL-DRO, whose weights softmax(l_i / r) are nearly one-hot when the
  raw losses differ by much more than r, diverges at the shared rate (B.3, Figure 8).
* 1500 steps (12 epochs): long enough for every stable strategy to settle on its
  plateau (for uniform weights, the least-squares fit of all points, outliers
  included), so the steps to a common target are measurable.
The smaller IR-DRO rate is the largest of `dro_learning_rates` at which every seed
stays finite and ends below its initial test loss.

For one seed all strategies see the same data and the same minibatch order, so the
comparison is paired; seeds vary both the problem (W*, b*, outliers) and the order.

Run:  python -m benchmarks.toy_regression            (10-20 s on 2 CPU cores)
Out:  docs/results/toy_regression.json, toy_regression.png, toy_regression_dro.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from benchmarks.plot_style import COLORS, LABELS
from benchmarks.results_doc import RESULTS_DIR, write_results_section
from megatron_reweight import compute_weights

STRATEGIES = ("uniform", "linupper", "quadratic", "extremes", "capped", "irdro")
# A run whose test loss passes this is counted as diverged and stopped.
DIVERGED_LOSS = 1e8


@dataclass(frozen=True)
class ToyConfig:
    features: int = 64  # p
    clean_points: int = 3200  # n
    outliers: int = 800  # m
    test_points: int = 2000
    noise: float = 0.1  # c
    outlier_offset: float = 2.0
    outlier_scale: float = 0.1
    batch_size: int = 32
    learning_rate: float = 0.01
    dro_learning_rates: tuple[float, ...] = (0.005, 0.003, 0.002, 0.001)  # below 2 / 257
    steps: int = 1500
    eval_every: int = 10
    r: float = 1.0  # Eq. (4) temperature, r = 1 as in Figure 7
    delta: float = 1.0
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    strategies: tuple[str, ...] = STRATEGIES


@dataclass
class Problem:
    train_x: torch.Tensor  # [n + m, p]
    train_y: torch.Tensor  # [n + m]
    is_outlier: torch.Tensor  # [n + m] bool
    test_x: torch.Tensor
    test_y: torch.Tensor


@dataclass
class RunResult:
    strategy: str
    learning_rate: float
    seed: int
    eval_steps: list[int]
    test_loss: list[float]
    outlier_weight_share: list[float]  # mean over each eval window of the batch weight on outliers
    max_weight_x_batch: list[float]  # max over each eval window of max_i w_i * b (Theorem 1 assumes <= 2: LinUpper's bound)
    weight_sum_error: float  # max |sum_i w_i - 1| over all steps
    min_weight: float
    diverged_at: int | None = None


def make_problem(cfg: ToyConfig, seed: int) -> Problem:
    """Appendix B.1 data; float64 so the comparison is not about rounding."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    true_w, true_b = normal(cfg.features), normal(())

    def clean(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = normal(count, cfg.features)
        return x, x @ true_w + true_b + cfg.noise * normal(count)

    clean_x, clean_y = clean(cfg.clean_points)
    outlier_x = cfg.outlier_scale * normal(cfg.outliers, cfg.features) + cfg.outlier_offset
    outlier_y = normal(cfg.outliers)
    test_x, test_y = clean(cfg.test_points)
    return Problem(
        train_x=torch.cat([clean_x, outlier_x]),
        train_y=torch.cat([clean_y, outlier_y]),
        is_outlier=torch.cat(
            [torch.zeros(cfg.clean_points, dtype=torch.bool), torch.ones(cfg.outliers, dtype=torch.bool)]
        ),
        test_x=test_x,
        test_y=test_y,
    )


def train(cfg: ToyConfig, problem: Problem, strategy: str, learning_rate: float, seed: int) -> RunResult:
    # The minibatch order depends on the seed only, never on the strategy: paired runs.
    order = torch.Generator().manual_seed(10_000 + seed)
    weight = torch.zeros(cfg.features, dtype=torch.float64)
    bias = torch.zeros((), dtype=torch.float64)

    def test_loss() -> float:
        return float((0.5 * (problem.test_x @ weight + bias - problem.test_y) ** 2).mean())

    result = RunResult(strategy, learning_rate, seed, [0], [test_loss()], [], [], 0.0, math.inf)
    outlier_share, max_weight = [], []
    for step in range(1, cfg.steps + 1):
        index = torch.randint(0, problem.train_x.shape[0], (cfg.batch_size,), generator=order)
        x, y = problem.train_x[index], problem.train_y[index]
        residual = x @ weight + bias - y
        w = compute_weights(0.5 * residual**2, strategy, r=cfg.r, delta=cfg.delta)
        result.weight_sum_error = max(result.weight_sum_error, abs(float(w.sum()) - 1.0))
        result.min_weight = min(result.min_weight, float(w.min()))
        outlier_share.append(float(w[problem.is_outlier[index]].sum()))
        max_weight.append(float(w.max()) * cfg.batch_size)

        # Gradient of sum_i w_i l_i; weights are constants (detached), as in Algorithm 1.
        weighted = w * residual
        weight -= learning_rate * (x.T @ weighted)
        bias -= learning_rate * weighted.sum()

        if step % cfg.eval_every == 0 or step == cfg.steps:
            loss = test_loss()
            result.eval_steps.append(step)
            result.test_loss.append(loss)
            result.outlier_weight_share.append(float(np.mean(outlier_share)))
            result.max_weight_x_batch.append(float(np.max(max_weight)))
            outlier_share, max_weight = [], []
            if not math.isfinite(loss) or loss > DIVERGED_LOSS:
                result.diverged_at = step
                break
    return result


def steps_to_reach(eval_steps: list[int], curve: np.ndarray, target: float) -> int | None:
    """First evaluated step at which `curve` is at or below `target` (None: never)."""
    hits = np.nonzero(curve <= target)[0]
    return int(eval_steps[hits[0]]) if hits.size else None


def least_squares_test_loss(problem: Problem, clean_only: bool) -> float:
    """Test loss of the exact least-squares fit: where uniform SGD ends (all points,
    up to SGD noise) and the best a method that ignored the outliers could do."""
    keep = ~problem.is_outlier if clean_only else torch.ones_like(problem.is_outlier)
    design = torch.cat([problem.train_x[keep], torch.ones(int(keep.sum()), 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, problem.train_y[keep]).solution
    prediction = problem.test_x @ solution[:-1] + solution[-1]
    return float((0.5 * (prediction - problem.test_y) ** 2).mean())


def run_key(strategy: str, learning_rate: float) -> str:
    return f"{strategy}@lr={learning_rate:g}"


def summarise(runs: list[RunResult]) -> dict:
    """Per (strategy, learning rate): per-seed curves and their spread."""
    groups: dict[str, list[RunResult]] = {}
    for run in runs:
        groups.setdefault(run_key(run.strategy, run.learning_rate), []).append(run)
    summary = {}
    for key, group in groups.items():
        diverged = [r for r in group if r.diverged_at is not None]
        entry = {
            "strategy": group[0].strategy,
            "learning_rate": group[0].learning_rate,
            "seeds": [r.seed for r in group],
            "diverged_seeds": [r.seed for r in diverged],
            "diverged_at_steps": [r.diverged_at for r in diverged],
            "max_weight_sum_error": max(r.weight_sum_error for r in group),
            "min_weight": min(r.min_weight for r in group),
        }
        if not diverged:
            finals = np.array([r.test_loss[-1] for r in group])
            entry.update(
                {
                    "eval_steps": group[0].eval_steps,
                    "test_loss_per_seed": [[float(f"{v:.6g}") for v in r.test_loss] for r in group],
                    "final_test_loss_mean": float(finals.mean()),
                    "final_test_loss_std": float(finals.std()),
                    "outlier_weight_share_mean": np.mean([r.outlier_weight_share for r in group], axis=0)
                    .round(5)
                    .tolist(),
                    "outlier_weight_share_last_half": float(
                        np.mean([r.outlier_weight_share[len(r.outlier_weight_share) // 2 :] for r in group])
                    ),
                    "max_weight_x_batch": float(max(max(r.max_weight_x_batch) for r in group)),
                }
            )
        summary[key] = entry
    return summary


def steps_table(cfg: ToyConfig, summary: dict, keys: list[str]) -> dict:
    """Steps each strategy needs to reach Uniform's final test loss, per seed (the
    target is that seed's Uniform run) and on the seed-mean curves; plus the paired
    ratio of final test losses to Uniform's."""
    uniform = summary[run_key("uniform", cfg.learning_rate)]
    uniform_curves = np.array(uniform["test_loss_per_seed"])
    rows = {}
    for key in keys:
        entry = summary[key]
        if entry["diverged_seeds"]:
            rows[key] = {"diverged": True}
            continue
        curves = np.array(entry["test_loss_per_seed"])
        per_seed = [steps_to_reach(entry["eval_steps"], c, u[-1]) for c, u in zip(curves, uniform_curves)]
        reached = [s for s in per_seed if s is not None]
        ratio = curves[:, -1] / uniform_curves[:, -1]
        ratio_curve = (curves / uniform_curves).mean(axis=0)  # paired, then averaged over seeds
        best = int(np.argmin(ratio_curve))
        rows[key] = {
            "diverged": False,
            "steps_mean_curve": steps_to_reach(entry["eval_steps"], curves.mean(axis=0), uniform_curves[:, -1].mean()),
            "steps_per_seed": per_seed,
            "steps_median_of_seeds": float(np.median(reached)) if len(reached) == len(per_seed) else None,
            "seeds_reaching_target": len(reached),
            "final_ratio_to_uniform_mean": float(ratio.mean()),
            "final_ratio_to_uniform_std": float(ratio.std()),
            "lowest_mean_ratio_to_uniform": float(ratio_curve[best]),
            "lowest_mean_ratio_step": int(entry["eval_steps"][best]),
        }
    return {
        "target": "each seed's Uniform final test loss (lr shared)",
        "target_mean": float(uniform_curves[:, -1].mean()),
        "rows": rows,
    }


def plot(cfg: ToyConfig, results: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, dro_lr = results["summary"], results["dro_learning_rate"]
    references = results["least_squares_reference"]

    def band(ax, steps, curves, label, color, style="-", geometric=True):
        # The plateau differs by seed (the outliers' pull depends on W*), so on a log
        # axis the spread is shown as geometric mean x/ geometric std.
        steps = np.asarray(steps)
        if geometric:
            logs = np.log(curves)
            centre, low, high = (
                np.exp(logs.mean(0)),
                np.exp(logs.mean(0) - logs.std(0)),
                np.exp(logs.mean(0) + logs.std(0)),
            )
        else:
            centre, spread = curves.mean(0), curves.std(0)
            low, high = centre - spread, centre + spread
        ax.plot(steps, centre, style, color=color, label=label, lw=1.5)
        ax.fill_between(steps, low, high, color=color, alpha=0.18, lw=0)

    def diverged_label(entry) -> str:
        return f"diverged (step <= {max(entry['diverged_at_steps'])} on {len(entry['diverged_seeds'])}/{len(entry['seeds'])} seeds)"

    # Figure 7 analogue: every strategy at the shared learning rate.
    fig, (ax_loss, ax_ratio, ax_share) = plt.subplots(1, 3, figsize=(17, 4.8))
    uniform = np.array(summary[run_key("uniform", cfg.learning_rate)]["test_loss_per_seed"])
    for strategy in cfg.strategies:
        entry = summary[run_key(strategy, cfg.learning_rate)]
        if entry["diverged_seeds"]:
            ax_loss.plot([], [], color=COLORS[strategy], label=f"{LABELS[strategy]}: {diverged_label(entry)}")
            continue
        curves = np.array(entry["test_loss_per_seed"])
        band(ax_loss, entry["eval_steps"], curves, LABELS[strategy], COLORS[strategy])
        band(ax_ratio, entry["eval_steps"], curves / uniform, LABELS[strategy], COLORS[strategy], geometric=False)
        ax_share.plot(
            entry["eval_steps"][1:], entry["outlier_weight_share_mean"], color=COLORS[strategy], label=LABELS[strategy]
        )
    ax_loss.axhline(
        np.exp(np.mean(np.log(references["all_points"]))),
        color="gray",
        ls="--",
        lw=1,
        label="least squares on all points",
    )
    ax_loss.axhline(
        np.exp(np.mean(np.log(references["clean_points_only"]))),
        color="gray",
        ls=":",
        lw=1,
        label="least squares on clean points only",
    )
    ax_loss.set(
        yscale="log",
        xlabel="SGD step",
        ylabel="test loss on held-out clean data",
        title=f"lr={cfg.learning_rate:g}, b={cfg.batch_size}, r={cfg.r:g}: geometric mean ×/÷ std, {len(cfg.seeds)} seeds",
    )
    ax_loss.legend(fontsize=7.5)
    ax_ratio.axhline(1.0, color="gray", lw=0.8)
    ax_ratio.set(
        xlabel="SGD step",
        ylabel="test loss / Uniform's (same seed)",
        title="Paired ratio to Uniform (mean ± std over seeds)",
        ylim=(0, 2),
    )
    ax_ratio.legend(fontsize=7.5)
    ax_share.axhline(
        cfg.outliers / (cfg.clean_points + cfg.outliers), color="gray", ls=":", label="outlier fraction of the data"
    )
    ax_share.set(
        xlabel="SGD step",
        ylabel="weight on outliers per batch",
        title="Where the weight goes (mean over seeds)",
        ylim=(0, None),
    )
    ax_share.legend(fontsize=7.5)
    fig.tight_layout()
    main_png = out_dir / "toy_regression.png"
    fig.savefig(main_png, dpi=110)
    plt.close(fig)

    # Figure 8 analogue: KL-DRO at the shared rate and at the smaller rate where it converges.
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for strategy in ("uniform", "linupper"):
        entry = summary[run_key(strategy, cfg.learning_rate)]
        band(
            ax,
            entry["eval_steps"],
            np.array(entry["test_loss_per_seed"]),
            f"{LABELS[strategy]}, lr={cfg.learning_rate:g}",
            COLORS[strategy],
        )
    shared = summary[run_key("irdro", cfg.learning_rate)]
    if shared["diverged_seeds"]:
        ax.plot([], [], color=COLORS["irdro"], label=f"IR-DRO, lr={cfg.learning_rate:g}: {diverged_label(shared)}")
    else:
        band(
            ax,
            shared["eval_steps"],
            np.array(shared["test_loss_per_seed"]),
            f"IR-DRO, lr={cfg.learning_rate:g}",
            COLORS["irdro"],
        )
    if dro_lr is not None:
        entry = summary[run_key("irdro", dro_lr)]
        band(
            ax,
            entry["eval_steps"],
            np.array(entry["test_loss_per_seed"]),
            f"IR-DRO, lr={dro_lr:g}",
            COLORS["irdro"],
            "--",
        )
    ax.set(
        yscale="log",
        xlabel="SGD step",
        ylabel="test loss on held-out clean data",
        title=f"KL-DRO (r={cfg.r:g}) needs a smaller learning rate",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    dro_png = out_dir / "toy_regression_dro.png"
    fig.savefig(dro_png, dpi=110)
    plt.close(fig)
    return [main_png.name, dro_png.name]


def run_benchmark(cfg: ToyConfig) -> dict:
    runs, reference_all, reference_clean = [], [], []
    for seed in cfg.seeds:
        problem = make_problem(cfg, seed)
        reference_all.append(least_squares_test_loss(problem, clean_only=False))
        reference_clean.append(least_squares_test_loss(problem, clean_only=True))
        for strategy in cfg.strategies:
            runs.append(train(cfg, problem, strategy, cfg.learning_rate, seed))
        for lr in cfg.dro_learning_rates:
            runs.append(train(cfg, problem, "irdro", lr, seed))
    summary = summarise(runs)

    def converged(entry: dict) -> bool:
        return not entry["diverged_seeds"] and all(c[-1] < c[0] for c in entry["test_loss_per_seed"])

    dro_lr = next(
        (lr for lr in sorted(cfg.dro_learning_rates, reverse=True) if converged(summary[run_key("irdro", lr)])), None
    )
    keys = [run_key(s, cfg.learning_rate) for s in cfg.strategies] + ([run_key("irdro", dro_lr)] if dro_lr else [])
    return {
        "summary": summary,
        "dro_learning_rate": dro_lr,
        "least_squares_reference": {"all_points": reference_all, "clean_points_only": reference_clean},
        "steps_to_uniform_final": steps_table(cfg, summary, keys),
        "table_keys": keys,
    }


def markdown_section(report: dict) -> str:
    """The toy-regression block of docs/results.md, every number from `report`."""
    cfg, summary = report["config"], report["summary"]
    table = report["steps_to_uniform_final"]
    uniform_steps = table["rows"][f"uniform@lr={cfg['learning_rate']:g}"]["steps_median_of_seeds"]
    references = report["least_squares_reference"]
    lines = [
        f"Command: `{report['command']}` ({report['date']}, {report['runtime_seconds']:.0f} s on a {report['machine']['cpus']}-core CPU).",
        "",
        (
            f"Setup: p = {cfg['features']}, n = {cfg['clean_points']} clean points, m = {cfg['outliers']} outliers "
            f"({cfg['outliers'] / (cfg['outliers'] + cfg['clean_points']):.0%} of the training set), noise c = {cfg['noise']:g}; "
            f"SGD from zero with batch size {cfg['batch_size']}, learning rate {cfg['learning_rate']:g} shared by all strategies, "
            f"{cfg['steps']} steps; r = {cfg['r']:g}, delta = {cfg['delta']:g}; seeds {', '.join(map(str, cfg['seeds']))} "
            f"(each seed: new W*, b*, data and minibatch order, shared by all strategies)."
        ),
        "",
        "![Test loss, paired ratio to Uniform, weight on outliers](results/toy_regression.png)",
        "",
        "![KL-DRO at the shared and at a smaller learning rate](results/toy_regression_dro.png)",
        "",
        "| strategy | lr | final test loss, mean ± std | final / Uniform (same seed) | lowest mean ratio to Uniform (step) | steps to Uniform's final loss, per seed | median | vs Uniform | max w·b | weight on outliers, 2nd half |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in report["table_keys"]:
        entry, row = summary[key], table["rows"][key]
        name = LABELS[entry["strategy"]]
        if row["diverged"]:
            lines.append(
                f"| {name} | {entry['learning_rate']:g} | diverged on {len(entry['diverged_seeds'])}/{len(entry['seeds'])} seeds "
                f"(test loss > {DIVERGED_LOSS:.0e} by step {max(entry['diverged_at_steps'])}) | | | | | | | |"
            )
            continue
        steps = ", ".join("never" if s is None else str(s) for s in row["steps_per_seed"])
        median = row["steps_median_of_seeds"]
        relative = (
            f"{median / uniform_steps:.2f}x"
            if median is not None
            else f"{row['seeds_reaching_target']}/{len(row['steps_per_seed'])} seeds reach it"
        )
        lines.append(
            f"| {name} | {entry['learning_rate']:g} | {entry['final_test_loss_mean']:.3f} ± {entry['final_test_loss_std']:.3f} "
            f"| {row['final_ratio_to_uniform_mean']:.3f} ± {row['final_ratio_to_uniform_std']:.3f} "
            f"| {row['lowest_mean_ratio_to_uniform']:.2f} ({row['lowest_mean_ratio_step']}) | {steps} "
            f"| {'-' if median is None else f'{median:.0f}'} | {relative} | {entry['max_weight_x_batch']:.2f} "
            f"| {entry['outlier_weight_share_last_half']:.3f} |"
        )
    lines += [
        "",
        (
            f"The smaller IR-DRO learning rate is the largest of {', '.join(f'{lr:g}' for lr in cfg['dro_learning_rates'])} at which every seed "
            f"converges: {report['dro_learning_rate']:g}. References (mean over seeds): exact least squares on all training points "
            f"{np.mean(references['all_points']):.3f}, on the clean points only {np.mean(references['clean_points_only']):.4f} "
            f"(c^2/2 = {cfg['noise'] ** 2 / 2:.4f}). The outliers are {cfg['outliers'] / (cfg['outliers'] + cfg['clean_points']):.0%} of the data, "
            f"so uniform weighting puts {cfg['outliers'] / (cfg['outliers'] + cfg['clean_points']):.2f} of each batch's weight on them on average."
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--steps", type=int, default=ToyConfig.steps)
    parser.add_argument("--seeds", type=int, default=len(ToyConfig.seeds), help="number of seeds (0, 1, ...)")
    args = parser.parse_args()
    cfg = ToyConfig(steps=args.steps, seeds=tuple(range(args.seeds)))
    torch.set_num_threads(1)  # tiny matrices: threading only adds noise

    start = time.perf_counter()
    results = run_benchmark(cfg)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot(cfg, results, args.out_dir)
    runtime = time.perf_counter() - start

    report = {
        "benchmark": "toy_regression",
        "command": "python -m benchmarks.toy_regression"
        + (
            ""
            if args.steps == ToyConfig.steps and args.seeds == len(ToyConfig.seeds)
            else f" --steps {args.steps} --seeds {args.seeds}"
        ),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
        },
        "runtime_seconds": round(runtime, 1),
        "config": asdict(cfg),
        "plots": plots,
        **results,
    }
    path = args.out_dir / "toy_regression.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    if args.out_dir.resolve() == RESULTS_DIR:
        write_results_section("toy_regression", markdown_section(report), "toy_regression")

    table = results["steps_to_uniform_final"]
    print(f"target: each seed's Uniform final test loss (mean {table['target_mean']:.4f})")
    for key in results["table_keys"]:
        entry, row = results["summary"][key], table["rows"][key]
        if row["diverged"]:
            print(f"{key:22s} diverged")
            continue
        print(
            f"{key:22s} final {entry['final_test_loss_mean']:.4f} ± {entry['final_test_loss_std']:.4f}"
            f"  ratio to Uniform {row['final_ratio_to_uniform_mean']:.3f} ± {row['final_ratio_to_uniform_std']:.3f}"
            f"  steps to target {row['steps_per_seed']} (mean curve {row['steps_mean_curve']})"
        )
    print(f"wrote {path} and {', '.join(plots)} in {runtime:.1f} s")


if __name__ == "__main__":
    main()
