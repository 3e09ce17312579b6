"""What the weight audit shows on the tiny LM experiments, and whether the exact window pays.

Reads the weight audits (--reweight-audit-dir) and run summaries that `benchmarks.tiny_lm_domains`
wrote, and answers:
  noise       do the documents the reweighting pushes down (the bottom 10% by mean weight x b
              after the r warm-up) find the injected random-token documents? Their share
              (precision), the share of all noise documents they hold (recall), and the same for
              the top 10%, per strategy, over seeds;
  redundancy  the repeated documents' weight x b over training, and against the number of times
              the model has already seen the same text;
  window      the per-micro-batch window (b = micro-batch x DP = 8) against the global window
              (b = 32, one micro-batch per step): the paired difference of the final validation
              perplexity per seed, and how far the weights differ per step: the global window's
              weights recomputed (compute_weights) over each step's 32 losses of the
              per-micro-batch run's audit, against the weights that run used (mean and max of
              |delta w| x 32 per step).

Make the runs first (each writes its audit under AUDIT_ROOT/<experiment>/<strategy>-seed<k>):
  python -m benchmarks.tiny_lm_domains --experiment domains --strategies linupper --micro-batch-size 8 \\
      --name tiny_lm_window --audit-dir AUDIT_ROOT/window
  python -m benchmarks.tiny_lm_domains --experiment noise --strategies linupper quadratic \\
      --train-iters 500 --reweight-r-warmup-steps 50 --name tiny_lm_noise500 --audit-dir AUDIT_ROOT/noise
  python -m benchmarks.tiny_lm_domains --experiment redundancy --strategies linupper \\
      --train-iters 500 --reweight-r-warmup-steps 50 --name tiny_lm_redundancy500 --audit-dir AUDIT_ROOT/redundancy
The global-window runs are the domains experiment's LinUpper runs (docs/results/tiny_lm_domains/):
the same settings and seeds with one micro-batch of 32 per step.
Then:  python -m benchmarks.weight_audit --audit-root AUDIT_ROOT
Out:   docs/results/weight_audit.json, weight_audit_*.png, the weight_audit block of docs/results.md
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from benchmarks.plot_style import COLORS, LABELS
from benchmarks.results_doc import RESULTS_DIR, write_results_section
from megatron_reweight.audit import read_audit
from megatron_reweight.audit.report import columns, document_weights
from megatron_reweight.strategies import compute_weights

SEEDS = (1, 2, 3)
SHARE = 0.10  # the bottom (and top) tenth of the documents by mean weight
TIME_BIN = 25  # steps per point of the redundancy curves
REPEATED_DOCUMENTS = 8  # benchmarks.tiny_lm_domains: the repeated domain is these documents, in turn


def _stats(values) -> dict:
    values = [float(v) for v in values]
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "per_seed": values}  # fmt: skip


def _after_warmup(meta_table, warmup_r: float = 100.0):
    import pyarrow.compute as pc

    meta, table = meta_table
    return meta, table.filter(pc.not_equal(table["r"], warmup_r))


# --- noise --------------------------------------------------------------------------------------


def noise_run(audit_dir: Path) -> dict:
    meta, table = _after_warmup(read_audit(audit_dir))
    docs = document_weights(table, meta["dataset_domains"])
    is_noise = np.array([d == "noise" for d in docs.domains])
    order = np.argsort(docs.mean_weight_x_b, kind="stable")
    count = max(1, round(SHARE * len(order)))
    result = {"documents": len(order), "noise_documents": int(is_noise.sum()), "noise_share": float(is_noise.mean())}
    for name, chosen in (("bottom", order[:count]), ("top", order[::-1][:count])):
        hits = int(is_noise[chosen].sum())
        result[name] = {"precision": hits / count, "recall": hits / max(1, int(is_noise.sum()))}
    result["noise_mean_weight_x_b"] = float(columns(table)["weight_x_b"][np.asarray(columns(table)["domain"] == "noise")].mean())
    return result


def analyse_noise(root: Path, strategies: list[str]) -> dict:
    out = {}
    for strategy in strategies:
        runs = [noise_run(root / f"{strategy}-seed{seed}") for seed in SEEDS]
        out[strategy] = {
            "documents": _stats([r["documents"] for r in runs]),
            "noise_share_of_documents": _stats([r["noise_share"] for r in runs]),
            "noise_mean_weight_x_b": _stats([r["noise_mean_weight_x_b"] for r in runs]),
            **{f"{end}_{key}": _stats([r[end][key] for r in runs]) for end in ("bottom", "top") for key in ("precision", "recall")},
        }
    return out


# --- redundancy ----------------------------------------------------------------------------------


def redundancy_run(audit_dir: Path) -> dict:
    meta, table = read_audit(audit_dir)
    values = columns(table)
    last = int(values["iteration"].max())
    edges = np.arange(1, last + 2, TIME_BIN)
    repeated = values["domain"] == "repeated"
    curves = {"repeated": [], "others": []}
    for begin, end in zip(edges[:-1], edges[1:]):
        in_bin = (values["iteration"] >= begin) & (values["iteration"] < end)
        curves["repeated"].append(float(values["weight_x_b"][in_bin & repeated].mean()))
        curves["others"].append(float(values["weight_x_b"][in_bin & ~repeated].mean()))
    # Exposures: how many earlier samples came from the same text (document id mod 8 in the
    # repeated domain), for each repeated sample after the warm-up.
    documents = table["documents"].to_pylist()
    seen: dict[int, int] = {}
    exposures, weights = [], []
    for i in np.flatnonzero(repeated):
        text = documents[i][0] % REPEATED_DOCUMENTS
        if values["r"][i] != 100.0:
            exposures.append(seen.get(text, 0))
            weights.append(values["weight_x_b"][i])
        seen[text] = seen.get(text, 0) + 1
    return {"bin_starts": edges[:-1].tolist(), "curves": curves, "exposures": np.array(exposures), "weights": np.array(weights)}


def analyse_redundancy(root: Path, strategies: list[str]) -> dict:
    out = {}
    for strategy in strategies:
        runs = [redundancy_run(root / f"{strategy}-seed{seed}") for seed in SEEDS]
        bins = [0, 25, 50, 100, 200, 400, 800, 1600, 10**9]
        by_exposure = []
        for low, high in zip(bins[:-1], bins[1:]):
            per_seed = [r["weights"][(r["exposures"] >= low) & (r["exposures"] < high)] for r in runs]
            if all(len(w) for w in per_seed):
                by_exposure.append({"exposures": [low, high], **_stats([w.mean() for w in per_seed])})
        first_after = next(i for i, s in enumerate(runs[0]["bin_starts"]) if s > 50)
        out[strategy] = {
            "bin_starts": runs[0]["bin_starts"],
            "repeated_over_time": {k: np.mean([r["curves"][k] for r in runs], axis=0).round(4).tolist() for k in ("repeated", "others")},
            "repeated_over_time_min": np.min([r["curves"]["repeated"] for r in runs], axis=0).round(4).tolist(),
            "repeated_over_time_max": np.max([r["curves"]["repeated"] for r in runs], axis=0).round(4).tolist(),
            "repeated_first_bin_after_warmup": _stats([r["curves"]["repeated"][first_after] for r in runs]),
            "repeated_last_bin": _stats([r["curves"]["repeated"][-1] for r in runs]),
            "by_exposure": by_exposure,
        }
    return out


# --- window --------------------------------------------------------------------------------------


def window_weight_difference(audit_dir: Path, global_batch: int) -> dict:
    """Per step after the warm-up: the per-micro-batch run's weight x 32 (its weight x 8) against
    compute_weights over the step's 32 losses x 32."""
    meta, table = _after_warmup(read_audit(audit_dir))
    values = columns(table)
    losses = values["loss"].reshape(-1, global_batch)
    used = values["weight_x_b"].reshape(-1, global_batch)  # w_micro x 8 = (w_micro / 4) x 32
    r = values["r"].reshape(-1, global_batch)[:, 0]
    exact = np.stack([
        compute_weights(torch.tensor(step, dtype=torch.float64), meta["strategy"], r=float(step_r)).numpy()
        for step, step_r in zip(losses, r)
    ]) * global_batch  # fmt: skip
    difference = np.abs(used - exact)
    return {
        "steps": int(len(losses)),
        "mean_abs_dw_x_b": float(difference.mean()),
        "mean_of_step_max_abs_dw_x_b": float(difference.max(axis=1).mean()),
        "max_abs_dw_x_b": float(difference.max()),
        "max_w_x_b_micro": float(used.max(axis=1).mean()),
        "max_w_x_b_global": float(exact.max(axis=1).mean()),
        "correlation": float(np.corrcoef(used.ravel(), exact.ravel())[0, 1]),
    }


def analyse_window(audit_root: Path, micro_runs: Path, global_runs: Path) -> dict:
    micro = [json.loads((micro_runs / f"linupper-seed{s}.json").read_text()) for s in SEEDS]
    full = [json.loads((global_runs / f"linupper-seed{s}.json").read_text()) for s in SEEDS]
    for m, g in zip(micro, full):
        settings = {k: v for k, v in m["config"].items() if k != "micro_batch_size"}
        if settings != g["config"] or {**m["reweight"], "audit_dir": None} != {**g["reweight"], "audit_dir": None}:
            raise SystemExit("the per-micro-batch and global-window runs differ in more than the micro-batch size")
    domains = micro[0]["domains"]

    def final(run):
        ppl = {d: run["eval_history"][-1]["domains"][d]["ppl"] for d in domains}
        return {**ppl, "mean": float(np.mean(list(ppl.values())))}

    columns_ = [*domains, "mean"]
    micro_final, global_final = [final(r) for r in micro], [final(r) for r in full]
    uniform = [json.loads((global_runs / f"uniform-seed{s}.json").read_text()) for s in SEEDS]
    uniform_final = [final(r) for r in uniform]
    differences = [window_weight_difference(audit_root / f"linupper-seed{s}", micro[0]["config"]["batch_size"]) for s in SEEDS]

    def weights_after_warmup(run):
        w = run["per_domain_windows"]
        window, warmup = w["window"], run["reweight"]["warmup_steps"]
        rows = [(np.array(x, dtype=float), np.array(n, dtype=float)) for i, (x, n) in enumerate(zip(w["weight_x_b"], w["samples"])) if i * window >= warmup]
        totals = sum(x * n for x, n in rows) / sum(n for _, n in rows)
        return dict(zip(domains, totals.round(4).tolist()))

    return {
        "domains": domains,
        "final_ppl": {
            "micro-batch": {c: _stats([f[c] for f in micro_final]) for c in columns_},
            "global-batch": {c: _stats([f[c] for f in global_final]) for c in columns_},
            "uniform": {c: _stats([f[c] for f in uniform_final]) for c in columns_},
        },
        "paired_micro_vs_global_percent": {c: _stats([100 * (m[c] / g[c] - 1) for m, g in zip(micro_final, global_final)]) for c in columns_},
        "paired_vs_uniform_percent": {
            name: _stats([100 * (f["mean"] / u["mean"] - 1) for f, u in zip(finals, uniform_final)])
            for name, finals in (("micro-batch", micro_final), ("global-batch", global_final))
        },
        "weight_difference": {k: _stats([d[k] for d in differences]) for k in differences[0]},
        "domain_weight_after_warmup": {
            "micro-batch": [weights_after_warmup(r) for r in micro],
            "global-batch": [weights_after_warmup(r) for r in full],
        },
        "run_seconds": {"micro-batch": [r["runtime_seconds"] for r in micro], "global-batch": [r["runtime_seconds"] for r in full]},
        "config": micro[0]["config"],
    }


# --- plots and the results block ---------------------------------------------------------------------


def plot(report: dict, out_dir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    for strategy, r in report["redundancy"].items():
        starts = np.array(r["bin_starts"]) + TIME_BIN / 2
        left.plot(starts, r["repeated_over_time"]["repeated"], color=COLORS.get(strategy), label=f"{LABELS.get(strategy, strategy)}: repeated")
        left.fill_between(starts, r["repeated_over_time_min"], r["repeated_over_time_max"], color=COLORS.get(strategy), alpha=0.2)
        left.plot(starts, r["repeated_over_time"]["others"], color=COLORS.get(strategy), ls="--", label="the other domains")
        x = [np.sqrt(b["exposures"][0] * min(b["exposures"][1], 4 * max(b["exposures"][0], 1))) or 1 for b in r["by_exposure"]]
        right.errorbar(x, [b["mean"] for b in r["by_exposure"]], yerr=[b["std"] for b in r["by_exposure"]], marker="o",
                       color=COLORS.get(strategy), label=LABELS.get(strategy, strategy))  # fmt: skip
    left.axhline(1.0, color="gray", lw=0.8)
    left.set(xlabel="step", ylabel=f"mean weight x b ({TIME_BIN}-step bins)", title="Repeated documents' weight over training")
    left.legend(fontsize=8)
    right.axhline(1.0, color="gray", lw=0.8)
    right.set(xscale="log", xlabel="times the same text was seen before", ylabel="mean weight x b (after the warm-up)",
              title="...against how often the model has seen it")  # fmt: skip
    fig.tight_layout()
    plots["redundancy"] = "weight_audit_redundancy.png"
    fig.savefig(out_dir / plots["redundancy"], dpi=100)
    plt.close(fig)
    return plots


def _pm(s: dict, digits: int = 2, scale: float = 1.0, sign: bool = False) -> str:
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f"{f.format(s['mean'] * scale)} ± {s['std'] * scale:.{digits}f}"


def markdown_section(report: dict) -> str:
    noise, red, win = report["noise"], report["redundancy"], report["window"]
    lines = [f"Command: `{report['command']}` ({report['date']}); the runs' commands are in the script's docstring.", ""]
    lines += [
        f"**Noise** ({report['noise_setup']}). Documents seen after the r warm-up, ranked by mean weight x b "
        f"over their samples; the bottom and top {SHARE:.0%} against the known labels (mean ± standard deviation over "
        f"seeds {', '.join(map(str, SEEDS))}):",
        "",
        "| strategy | documents | noise share of them | noise mean w·b | bottom 10%: precision | bottom 10%: recall | top 10%: precision | top 10%: recall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s, n in noise.items():
        lines.append(
            f"| {LABELS.get(s, s)} | {n['documents']['mean']:.0f} | {_pm(n['noise_share_of_documents'])} | {_pm(n['noise_mean_weight_x_b'])} "
            f"| {_pm(n['bottom_precision'])} | {_pm(n['bottom_recall'])} | {_pm(n['top_precision'])} | {_pm(n['top_recall'])} |"
        )
    lines += ["", f"**Redundancy** ({report['redundancy_setup']}).", "", f"![Repeated documents' weight](results/{report['plots']['redundancy']})", ""]
    lines += ["| strategy | repeated w·b, first 25 steps after the warm-up | last 25 steps | by exposures before: " + ", ".join(
        f"{b['exposures'][0]}-{b['exposures'][1] if b['exposures'][1] < 10**8 else '...'}" for b in next(iter(red.values()))["by_exposure"]) + " |",
        "|---|---|---|---|"]  # fmt: skip
    for s, r in red.items():
        lines.append(f"| {LABELS.get(s, s)} | {_pm(r['repeated_first_bin_after_warmup'])} | {_pm(r['repeated_last_bin'])} | "
                     + ", ".join(_pm(b) for b in r["by_exposure"]) + " |")  # fmt: skip
    fp, paired, dw = win["final_ppl"], win["paired_micro_vs_global_percent"], win["weight_difference"]
    cfg = win["config"]
    columns_ = [*win["domains"], "mean"]
    lines += [
        "",
        f"**Window** (LinUpper, r = 0.4 after r = 100 for {cfg['reweight_r_warmup_steps']} steps, {cfg['train_iters']} steps of 32 "
        f"sequences of {cfg['seq_length']} tokens, seeds {', '.join(map(str, SEEDS))}, the same initialisation and data order per seed). "
        f"Per-micro-batch: 4 micro-batches of 8 per step, each weighted on its own (b = 8); global: one micro-batch of 32 (b = 32). "
        "Final validation perplexity, mean ± standard deviation over seeds:",
        "",
        "| window | " + " | ".join(columns_) + " |",
        "|---|" + "---|" * len(columns_),
    ]
    for name in ("micro-batch", "global-batch", "uniform"):
        label = {"micro-batch": "per micro-batch (b = 8)", "global-batch": "global (b = 32)", "uniform": "Uniform (no reweighting)"}[name]
        lines.append(f"| {label} | " + " | ".join(_pm(fp[name][c]) for c in columns_) + " |")
    lines.append("| per micro-batch / global - 1, paired, % | " + " | ".join(_pm(paired[c], sign=True) for c in columns_) + " |")
    lines += [
        "",
        "Per seed, mean column: per micro-batch vs global " + ", ".join(f"{v:+.2f}%" for v in paired["mean"]["per_seed"])
        + "; against Uniform: per micro-batch " + ", ".join(f"{v:+.2f}%" for v in win["paired_vs_uniform_percent"]["micro-batch"]["per_seed"])
        + ", global " + ", ".join(f"{v:+.2f}%" for v in win["paired_vs_uniform_percent"]["global-batch"]["per_seed"]) + ".",
        "",
        f"How far the weights differ, on the per-micro-batch runs' own losses ({dw['steps']['mean']:.0f} steps after the warm-up per seed): "
        "the global window's weights recomputed over each step's 32 losses against the weights the run used, both x 32:",
        "",
        "| mean \\|Δw\\|·b | mean over steps of the step's max \\|Δw\\|·b | largest \\|Δw\\|·b | max w·b per step, per micro-batch / global | correlation of the weights |",
        "|---|---|---|---|---|",
        f"| {_pm(dw['mean_abs_dw_x_b'], 3)} | {_pm(dw['mean_of_step_max_abs_dw_x_b'])} | {_pm(dw['max_abs_dw_x_b'])} | "
        f"{_pm(dw['max_w_x_b_micro'])} / {_pm(dw['max_w_x_b_global'])} | {_pm(dw['correlation'], 3)} |",
        "",
        "Mean weight x b per domain after the warm-up, mean over seeds: "
        + "; ".join(
            f"{name}: " + ", ".join(f"{d} {np.mean([w[d] for w in win['domain_weight_after_warmup'][name]]):.2f}" for d in win["domains"])
            for name in ("micro-batch", "global-batch")
        ) + ".",
    ]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--audit-root", type=Path, required=True, help="the runs' --audit-dir parent: window/, noise/, redundancy/")
    parser.add_argument("--micro-runs", type=Path, default=RESULTS_DIR / "tiny_lm_window", help="the per-micro-batch runs' summaries")
    parser.add_argument("--global-runs", type=Path, default=RESULTS_DIR / "tiny_lm_domains", help="the global-window runs' summaries")
    parser.add_argument("--noise-setup", default="the noise experiment, 500 steps with r = 100 for the first 50, LinUpper and Quadratic r = 0.4")
    parser.add_argument("--redundancy-setup", default="the redundancy experiment, 500 steps with r = 100 for the first 50, LinUpper r = 0.4")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()

    report = {
        "benchmark": "weight_audit",
        "command": "python -m benchmarks.weight_audit --audit-root AUDIT_ROOT",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "noise_setup": args.noise_setup,
        "redundancy_setup": args.redundancy_setup,
        "noise": analyse_noise(args.audit_root / "noise", ["linupper", "quadratic"]),
        "redundancy": analyse_redundancy(args.audit_root / "redundancy", ["linupper"]),
        "window": analyse_window(args.audit_root / "window", args.micro_runs, args.global_runs),
    }
    report["plots"] = plot(report, args.out_dir)
    (args.out_dir / "weight_audit.json").write_text(json.dumps(report, indent=1) + "\n")
    section = markdown_section(report)
    if args.out_dir.resolve() == RESULTS_DIR:
        write_results_section("weight_audit", section, "weight_audit")
    print(section)


if __name__ == "__main__":
    main()
