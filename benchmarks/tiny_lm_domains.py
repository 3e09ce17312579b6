"""A small language model on several domains, per strategy and seed (paper 1, Table 1 and
Figures 2 and 6; paper 2, Figure 2), and two experiments whose answer is known by construction.

Experiments (`--experiment`):
  domains     the offline demo corpus's domains in equal shares; Uniform, LinUpper, Quadratic,
              Extremes and IR-DRO, 3 seeds each.
  noise       the same, plus a `noise` domain of random token sequences (20% of the training
              samples: unlearnable, high loss); validation perplexity is reported on the clean
              domains. Which strategies put less weight on the noise, and does it buy clean
              perplexity? Uniform, LinUpper, Quadratic; 1,000 steps, 3 seeds.
  redundancy  the same, plus a `repeated` domain: 8 documents repeated 100 times (in equal share
              with the others: quickly memorised, low loss). Does LinUpper move weight off it
              (paper 1's argument), and what does that do to the other domains? Uniform,
              LinUpper, Quadratic; 1,000 steps, 3 seeds.

Every run goes through the project's trainer (`pretrain_llama.py`'s code). Within a seed all
strategies start from the same initialisation and see the same data in the same order
(Megatron's sequential sampler), so differences to Uniform are paired per seed. One
micro-batch per step (micro-batch = global batch = b = 32, as GPT-2 in paper 1's Table 7),
so each step's weights span the whole batch. r is Table 7's 0.4 for paper 1's strategies and
paper 2's 10 for IR-DRO, after r = 100 for a warm-up chosen past the point where the
per-sample loss spread has opened (the first plot shows that spread in the Uniform runs).

The trainer logs each domain's mean weight but not per-sample weights, so each run happens in
a worker process that subclasses the trainer's `SampleReweighter` to record every step's
losses, weights and domain ids, and saves a summary of them.

Resumable: each run's summary is written to `OUT_DIR/NAME/<strategy>-seed<k>.json` as soon as
that run completes; rerunning the same command skips the runs whose file holds the same
configuration. `--jobs 2` runs two single-threaded runs at a time.

Run:  python -m benchmarks.tiny_lm_domains --jobs 2                        (15 runs, ~50 min on 2 cores)
      python -m benchmarks.tiny_lm_domains --experiment noise --jobs 2       (9 runs, ~15 min)
      python -m benchmarks.tiny_lm_domains --experiment redundancy --jobs 2  (9 runs, ~15 min)
Out:  docs/results/NAME.json, NAME_*.png, NAME/ (one file per run), the NAME block of docs/results.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks.plot_style import COLORS, LABELS
from benchmarks.results_doc import REPO_ROOT, RESULTS_DIR, write_results_section

# r per strategy: paper 1's Table 7 (GPT-2, b = 32) for its strategies, paper 2's for IR-DRO.
PAPER_R = {"irdro": 10.0}
PAPER_1_R = 0.4
WARMUP_R = 100.0
# The largest weight x b a histogram bin holds; larger ones land in the last bin.
HISTOGRAM_EDGES = np.round(np.arange(0.0, 8.0 + 1e-9, 0.05), 2)


@dataclass(frozen=True)
class LMConfig:
    experiment: str = "domains"
    strategies: tuple[str, ...] = ("uniform", "linupper", "quadratic", "extremes", "irdro")
    seeds: tuple[int, ...] = (1, 2, 3)
    preset: str = "tiny"
    # The preset's model; its sequence of 128 cut to 32 so that the three experiments' 48 runs
    # fit in about 90 minutes of a 2-core CPU (docs/results.md).
    num_layers: int = 4
    hidden_size: int = 128
    ffn_hidden_size: int = 384
    num_attention_heads: int = 4
    num_query_groups: int = 2
    seq_length: int = 32
    batch_size: int = 32  # micro-batch = global batch: one weighting group of b = 32 per step
    # Set: several micro-batches per step, each weighted on its own (the micro-batch window, b = this).
    micro_batch_size: int | None = None
    train_iters: int = 2000
    lr_warmup_iters: int = 50  # 2.5% of the steps, as Table 7's 500 of 20,000
    reweight_r_warmup_steps: int = 150  # r = 100 first: 7.5% of the steps, past the spread's opening
    eval_interval: int = 250
    eval_iters: int = 8  # global batches per domain and evaluation: 256 sequences
    log_interval: int = 50
    weight_window: int = 50  # steps per point of the weight-per-domain curves
    threads: int = 1
    extra_args: tuple[str, ...] = ()  # any other pretrain_llama.py flags
    audit_dir: str | None = None  # each run's weight audit in AUDIT_DIR/<strategy>-seed<k> (--reweight-audit-dir)

    def trainer_args(self, strategy: str, seed: int, data_args: list[str], metrics_file: Path) -> list[str]:
        return [
            "--preset", self.preset, "--device", "cpu", "--num-layers", str(self.num_layers),
            "--hidden-size", str(self.hidden_size), "--ffn-hidden-size", str(self.ffn_hidden_size),
            "--num-attention-heads", str(self.num_attention_heads), "--num-query-groups", str(self.num_query_groups),
            "--seq-length", str(self.seq_length),
            "--global-batch-size", str(self.batch_size), "--micro-batch-size", str(self.micro_batch_size or self.batch_size),
            "--train-iters", str(self.train_iters), "--lr-warmup-iters", str(self.lr_warmup_iters),
            "--eval-interval", str(self.eval_interval), "--eval-iters", str(self.eval_iters),
            "--log-interval", str(self.log_interval), "--seed", str(seed),
            "--reweight-strategy", strategy, "--reweight-r", str(PAPER_R.get(strategy, PAPER_1_R)),
            "--reweight-r-warmup-steps", str(self.reweight_r_warmup_steps),
            "--reweight-r-warmup-value", str(WARMUP_R),
            "--metrics-file", str(metrics_file), *data_args, *self.extra_args,
            *(["--reweight-audit-dir", f"{self.audit_dir}/{strategy}-seed{seed}"] if self.audit_dir else []),
        ]  # fmt: skip


# Each experiment's settings where they differ from LMConfig's; the mechanism experiments are
# shorter and compare fewer strategies, to fit the CPU budget.
EXPERIMENTS = {
    "domains": {},
    "noise": {"strategies": ("uniform", "linupper", "quadratic"), "train_iters": 1000, "reweight_r_warmup_steps": 100},
    "redundancy": {"strategies": ("uniform", "linupper", "quadratic"), "train_iters": 1000, "reweight_r_warmup_steps": 100},
}  # fmt: skip
SHAPE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "seq_length")
NOISE_SHARE = 0.2  # of the training samples
CONTROLLED_DOMAINS = ("noise", "repeated")  # left out of the mean perplexity
REPEATED_DOCUMENTS = 8
REPEATS = 100


# --- data: the demo corpus, plus the controlled domain --------------------------------------


def experiment_data(experiment: str, work_dir: Path) -> list[str]:
    """pretrain_llama.py's data flags for an experiment. The controlled domain is written under
    `work_dir` on first use, once per demo tokenizer (deterministic, so every run sees the same)."""
    from megatron_reweight.data.demo import ensure_demo_data

    demo = ensure_demo_data(REPO_ROOT / "data" / "demo")
    prefixes = demo.data_path[1::2]
    extra = {"domains": None, "noise": ("noise", NOISE_SHARE), "redundancy": ("repeated", 1 / (len(prefixes) + 1))}
    if experiment not in extra:
        raise SystemExit(f"--experiment {experiment}: choose one of {', '.join(extra)}")
    if extra[experiment] is None:
        weights = [1 / len(prefixes)] * len(prefixes)
        all_prefixes = list(prefixes)
    else:
        name, share = extra[experiment]
        corpus = hashlib.sha256(demo.tokenizer_path.read_bytes()).hexdigest()[:12]
        prefix = work_dir / experiment / corpus / name
        if not Path(f"{prefix}.idx").is_file():
            write = write_noise_domain if experiment == "noise" else write_repeated_domain
            write(prefixes, prefix, demo.vocab_size, demo.eod_id)
        weights = [(1 - share) / len(prefixes)] * len(prefixes) + [share]
        all_prefixes = [*prefixes, str(prefix)]
    data_path = [token for w, p in zip(weights, all_prefixes) for token in (f"{w:.6f}", p)]
    return ["--data-path", *data_path, "--tokenizer-model", str(demo.tokenizer_path)]


def _documents(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return [np.array(dataset[i]) for i in range(len(dataset))]  # copies: the file is unmapped on return


def _write_domain(prefix: Path, documents: list[np.ndarray], vocab_size: int) -> None:
    from megatron_reweight.data.indexed import IndexedDatasetBuilder, files_of, publish, token_dtype

    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = prefix.with_name(prefix.name + ".tmp")
    bin_file, idx_file = files_of(tmp_prefix)
    builder = IndexedDatasetBuilder(str(bin_file), dtype=token_dtype(vocab_size))
    for tokens in documents:
        builder.add_document(tokens, [len(tokens)])
    builder.finalize(str(idx_file))
    publish(tmp_prefix, prefix)


def write_noise_domain(clean_prefixes: list[str], prefix: Path, vocab_size: int, eod_id: int) -> None:
    """Random token sequences, lengths drawn from the clean documents', each ending in the
    end-of-document token as prepared documents do; one noise document per four clean ones."""
    rng = np.random.default_rng(0)
    lengths = [len(d) for p in clean_prefixes for d in _documents(p)]
    documents = []
    for length in rng.choice(lengths, size=round(len(lengths) * NOISE_SHARE / (1 - NOISE_SHARE))):
        tokens = rng.integers(0, vocab_size - 1, size=length - 1)
        tokens[tokens >= eod_id] += 1  # any token but end-of-document
        documents.append(np.append(tokens, eod_id))
    _write_domain(prefix, documents, vocab_size)


def write_repeated_domain(clean_prefixes: list[str], prefix: Path, vocab_size: int, eod_id: int) -> None:
    """The first documents of the first clean domain, each repeated `REPEATS` times."""
    documents = _documents(clean_prefixes[0])[:REPEATED_DOCUMENTS]
    _write_domain(prefix, documents * REPEATS, vocab_size)


# --- worker: one training run, summarised from its per-sample record ------------------------


def worker(cfg: LMConfig, strategy: str, seed: int, data_args: list[str], out: Path) -> None:
    import torch

    torch.set_num_threads(cfg.threads)
    import megatron_reweight.training.trainer as trainer_module
    from megatron_reweight.training import parse_config, train

    steps: list[dict] = []

    class RecordingReweighter(trainer_module.SampleReweighter):
        def loss_func(self, loss_mask, output_tensor, domain_ids=None):
            result = super().loss_func(loss_mask, output_tensor, domain_ids)
            window = {
                "step": self.step,
                "r": self.temperature(),
                "losses": self.last_losses.double().numpy().copy(),
                "weights_x_b": self.last_weights.double().numpy() * self.last_weights.numel(),
                "domain_ids": domain_ids.numpy().copy(),  # one process: the whole window
            }
            if steps and steps[-1]["step"] == self.step:  # the step's next micro-batch window
                for key in ("losses", "weights_x_b", "domain_ids"):
                    steps[-1][key] = np.concatenate([steps[-1][key], window[key]])
            else:
                steps.append(window)
            return result

    trainer_module.SampleReweighter = RecordingReweighter

    metrics_file = out.with_suffix(".jsonl")
    config = parse_config(cfg.trainer_args(strategy, seed, data_args, metrics_file))
    start = time.perf_counter()
    result = train(config)
    runtime = time.perf_counter() - start
    run_record = next(json.loads(line) for line in metrics_file.read_text().splitlines() if '"kind": "run"' in line)
    metrics_file.unlink()
    summary = {
        "strategy": strategy,
        "seed": seed,
        "config": run_config(cfg),
        "runtime_seconds": round(runtime, 1),
        "domains": run_record["domains"],
        "parameters": run_record["parameters"],
        "reweight": flat_reweight(run_record["config"]["reweight"]),
        "train_history": [{k: h[k] for k in ("iteration", "lm loss")} for h in result.train_history],
        "eval_history": result.eval_history,
        **summarise_steps(steps, len(run_record["domains"]), cfg.weight_window),
    }
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(summary))
    os.replace(tmp, out)


def flat_reweight(reweight: dict) -> dict:
    """The run's reweighting settings with the temperature schedule's inline (r, warmup_steps, ...)."""
    return {**{k: v for k, v in reweight.items() if k != "temperature"}, **reweight["temperature"]}


def summarise_steps(steps: list[dict], num_domains: int, window: int) -> dict:
    """What the analysis needs from every step's losses, weights and domains, compactly."""
    losses = np.stack([s["losses"] for s in steps])  # [steps, samples per step]
    w_times_b = np.stack([s["weights_x_b"] for s in steps])  # weight x its window's b
    domain_ids = np.stack([s["domain_ids"] for s in steps])
    reweighted = np.array([s["r"] != WARMUP_R for s in steps])
    per_domain = {"weight_x_b": [], "loss": [], "samples": []}
    for begin in range(0, len(steps), window):
        ids, w, loss = domain_ids[begin : begin + window], w_times_b[begin : begin + window], losses[begin : begin + window]
        counts = [int((ids == d).sum()) for d in range(num_domains)]
        per_domain["samples"].append(counts)
        per_domain["weight_x_b"].append([float(w[ids == d].mean()) if c else None for d, c in enumerate(counts)])
        per_domain["loss"].append([float(loss[ids == d].mean()) if c else None for d, c in enumerate(counts)])
    kept = w_times_b[reweighted]
    counts, _ = np.histogram(np.minimum(kept, HISTOGRAM_EDGES[-1] - 1e-9), bins=HISTOGRAM_EDGES)
    return {
        "reweighted_steps": int(reweighted.sum()),
        # Per step: how far apart the samples' losses are (the warm-up should end after it opens).
        "loss_std_per_step": losses.std(axis=1).round(4).tolist(),
        # The share of that spread explained by the domains (between-domain variance / total).
        "domain_share_of_loss_variance_per_step": [
            round(_between_share(loss, ids, num_domains), 4) for loss, ids in zip(losses, domain_ids)
        ],
        "max_weight_x_b_per_step": w_times_b.max(axis=1).round(4).tolist(),
        "effective_sample_fraction_per_step": (1.0 / (np.square(w_times_b).sum(axis=1) / w_times_b.shape[1])).round(4).tolist(),
        "weight_x_b_histogram": counts.tolist(),
        "per_domain_windows": {"window": window, **per_domain},
    }


def _between_share(losses: np.ndarray, ids: np.ndarray, num_domains: int) -> float:
    total = losses.var()
    if total == 0:
        return 0.0
    between = sum((ids == d).mean() * (losses[ids == d].mean() - losses.mean()) ** 2 for d in range(num_domains) if (ids == d).any())
    return float(between / total)


# --- parent: the sweep --------------------------------------------------------------------


def run_config(cfg: LMConfig) -> dict:
    """The settings a saved run must share with the current command to be reused."""
    fields_ = asdict(cfg)
    for name in ("strategies", "seeds", "threads", "audit_dir"):
        fields_.pop(name)
    if fields_["micro_batch_size"] is None:  # runs saved before the setting existed
        fields_.pop("micro_batch_size")
    return json.loads(json.dumps(fields_))


def run_file(run_dir: Path, strategy: str, seed: int) -> Path:
    return run_dir / f"{strategy}-seed{seed}.json"


def completed(path: Path, cfg: LMConfig) -> dict | None:
    if not path.is_file():
        return None
    run = json.loads(path.read_text())
    return run if run.get("config") == run_config(cfg) else None


def launch(cfg: LMConfig, strategy: str, seed: int, data_args: list[str], out: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    env["OMP_NUM_THREADS"] = str(cfg.threads)
    command = [
        sys.executable, "-m", "benchmarks.tiny_lm_domains", "--worker", strategy, "--worker-seed", str(seed),
        "--worker-out", str(out), "--worker-config", json.dumps(asdict(cfg)), "--worker-data", json.dumps(data_args),
    ]  # fmt: skip
    start = time.perf_counter()
    log = out.with_suffix(".log")
    with log.open("w") as stream:
        process = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=stream, stderr=subprocess.STDOUT)
    if process.returncode:
        raise RuntimeError(f"{strategy} seed {seed} failed (exit {process.returncode}); see {log}")
    log.unlink()
    print(f"{time.strftime('%H:%M:%S')} done {strategy} seed {seed} in {time.perf_counter() - start:.0f} s", flush=True)


def sweep(cfg: LMConfig, run_dir: Path, work_dir: Path, jobs: int) -> dict[tuple[str, int], dict]:
    """Every (strategy, seed) run, seed by seed; runs already saved with this configuration are reused."""
    run_dir.mkdir(parents=True, exist_ok=True)
    todo = [(s, seed) for seed in cfg.seeds for s in cfg.strategies if completed(run_file(run_dir, s, seed), cfg) is None]
    print(f"{cfg.experiment}: {len(todo)} of {len(cfg.strategies) * len(cfg.seeds)} runs to do", flush=True)
    if todo:
        data_args = experiment_data(cfg.experiment, work_dir)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for future in [pool.submit(launch, cfg, s, seed, data_args, run_file(run_dir, s, seed)) for s, seed in todo]:
                future.result()
    runs = {(s, seed): completed(run_file(run_dir, s, seed), cfg) for seed in cfg.seeds for s in cfg.strategies}
    corpora = {tuple(run["domains"]) for run in runs.values()}
    if len(corpora) > 1:  # e.g. the demo corpus gained a source between runs
        raise SystemExit(f"the runs in {run_dir} were trained on different domains {sorted(corpora)}: delete it and rerun")
    return runs


# --- analysis --------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, "per_seed": values}


def analyse(cfg: LMConfig, runs: dict[tuple[str, int], dict], clean: list[str]) -> dict:
    first = next(iter(runs.values()))
    domains = first["domains"]
    seeds, strategies = list(cfg.seeds), list(cfg.strategies)

    def final_ppl(run: dict) -> dict[str, float]:
        ppl = {d: run["eval_history"][-1]["domains"][d]["ppl"] for d in domains}
        return {**ppl, "mean": float(np.mean([ppl[d] for d in clean]))}  # Table 1's mean over (clean) domains

    columns = [*domains, "mean"]
    final = {s: [final_ppl(runs[s, seed]) for seed in seeds] for s in strategies}
    table = {s: {c: _stats([f[c] for f in final[s]]) for c in columns} for s in strategies}
    uniform_spread = 100 * table["uniform"]["mean"]["std"] / table["uniform"]["mean"]["mean"] if "uniform" in table else None
    paired = {}
    for s in strategies:
        if s == "uniform" or "uniform" not in final:
            continue
        change = {c: _stats([100 * (f[c] / u[c] - 1) for f, u in zip(final[s], final["uniform"])]) for c in columns}
        signs = {np.sign(v) for v in change["mean"]["per_seed"]}
        change["exceeds_seed_spread"] = bool(len(signs) == 1 and abs(change["mean"]["mean"]) > uniform_spread)
        paired[s] = change

    curves = {}
    for s in strategies:
        history = [runs[s, seed]["eval_history"] for seed in seeds]
        per_column = {}
        for c in columns:
            values = np.array([[e["domains"][c]["ppl"] if c != "mean" else np.mean([e["domains"][d]["ppl"] for d in clean]) for e in h] for h in history])
            per_column[c] = {"mean": values.mean(0).tolist(), "min": values.min(0).tolist(), "max": values.max(0).tolist()}
        curves[s] = {"iterations": [e["iteration"] for e in history[0]], "ppl": per_column}

    weights = {}
    for s in strategies:
        if s == "uniform":
            continue
        seed_runs = [runs[s, seed] for seed in seeds]
        window = seed_runs[0]["per_domain_windows"]["window"]
        warmup = seed_runs[0]["reweight"]["warmup_steps"]
        over_time = np.array([[[np.nan if v is None else v for v in row] for row in r["per_domain_windows"]["weight_x_b"]] for r in seed_runs])
        samples = np.array([r["per_domain_windows"]["samples"] for r in seed_runs], dtype=float)
        after = np.arange(over_time.shape[1]) * window >= warmup
        weighted = np.nansum(over_time[:, after] * samples[:, after], axis=(0, 1)) / samples[:, after].sum(axis=(0, 1))
        max_w = np.concatenate([np.array(r["max_weight_x_b_per_step"])[warmup:] for r in seed_runs])
        ess = np.concatenate([np.array(r["effective_sample_fraction_per_step"])[warmup:] for r in seed_runs])
        weights[s] = {
            "r": seed_runs[0]["reweight"]["r"],
            "window_starts": (np.arange(over_time.shape[1]) * window).tolist(),
            "weight_x_b_over_time": {d: np.nanmean(over_time[:, :, i], axis=0).round(4).tolist() for i, d in enumerate(domains)},
            "weight_x_b_after_warmup": {d: float(weighted[i]) for i, d in enumerate(domains)},
            "max_weight_x_b_median": float(np.median(max_w)),
            "max_weight_x_b_max": float(max_w.max()),
            "steps_over_bound_2": int((max_w > 2).sum()),
            "steps_after_warmup": int(len(max_w)),
            "effective_sample_fraction_mean": float(ess.mean()),
            "weight_x_b_histogram": np.sum([r["weight_x_b_histogram"] for r in seed_runs], axis=0).tolist(),
        }

    spread = {}
    if "uniform" in strategies:
        uniform_runs = [runs["uniform", seed] for seed in seeds]
        spread = {
            "loss_std_per_step": [r["loss_std_per_step"] for r in uniform_runs],
            "domain_share_of_loss_variance_per_step": [r["domain_share_of_loss_variance_per_step"] for r in uniform_runs],
        }
    return {
        "domains": domains,
        "clean_domains": clean,
        "final_table": table,
        "uniform_seed_spread_percent": uniform_spread,
        "paired_change_percent": paired,
        "curves": curves,
        "weights": weights,
        "uniform_loss_spread": spread,
        "histogram_edges": HISTOGRAM_EDGES.tolist(),
        "run_seconds": {f"{s}-seed{seed}": r["runtime_seconds"] for (s, seed), r in runs.items()},
        "parameters": first["parameters"],
        "reweight": {s: runs[s, seeds[0]]["reweight"] for s in strategies},
    }


# --- plots -----------------------------------------------------------------------------------


def _smooth(values: np.ndarray, width: int) -> np.ndarray:
    return np.convolve(values, np.ones(width) / width, mode="valid")


def plot(cfg: LMConfig, analysis: dict, out_dir: Path, name: str) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    domains, clean = analysis["domains"], analysis["clean_domains"]
    strategies = list(analysis["curves"])

    # The per-sample loss spread in the Uniform runs: where r = 100 should end.
    spread = analysis["uniform_loss_spread"]
    if spread:
        fig, (ax_std, ax_share) = plt.subplots(1, 2, figsize=(11, 3.6))
        horizon = min(len(spread["loss_std_per_step"][0]), 4 * cfg.reweight_r_warmup_steps)
        width = max(1, min(10, horizon // 4))
        for seed, std, share in zip(cfg.seeds, spread["loss_std_per_step"], spread["domain_share_of_loss_variance_per_step"]):
            steps = np.arange(width, horizon + 1)
            ax_std.plot(steps, _smooth(np.array(std[:horizon]), width), label=f"seed {seed}")
            ax_share.plot(steps, _smooth(np.array(share[:horizon]), width), label=f"seed {seed}")
        for ax in (ax_std, ax_share):
            ax.axvline(cfg.reweight_r_warmup_steps, color="red", ls="--", label=f"end of r = {WARMUP_R:g}")
            ax.set(xlabel="step")
        ax_std.set(ylabel="std of the batch's sample losses", title=f"Per-sample loss spread, Uniform ({width}-step mean)")
        ax_share.set(ylabel="share of that variance between domains", title="How much of it the domain explains", ylim=(0, 1))
        ax_std.legend(fontsize=8)
        fig.tight_layout()
        plots["spread"] = f"{name}_spread.png"
        fig.savefig(out_dir / plots["spread"], dpi=100)
        plt.close(fig)

    # Validation perplexity against step: mean over seeds, band = min..max over seeds.
    panels = [*domains, "mean"]
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for s in strategies:
            curve = analysis["curves"][s]
            values = curve["ppl"][panel]
            ax.plot(curve["iterations"], values["mean"], color=COLORS.get(s), label=LABELS.get(s, s))
            ax.fill_between(curve["iterations"], values["min"], values["max"], color=COLORS.get(s), alpha=0.15)
        title = f"mean over {', '.join(clean)}" if panel == "mean" else panel + ("" if panel in clean else " (not in the mean)")
        ax.set(title=title, xlabel="step", ylabel="validation ppl", yscale="log")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{name}: validation perplexity, mean over {len(cfg.seeds)} seeds (band: min-max)")
    fig.tight_layout()
    plots["ppl"] = f"{name}_ppl.png"
    fig.savefig(out_dir / plots["ppl"], dpi=100)
    plt.close(fig)

    # Mean weight x b per domain over time, one panel per reweighting strategy.
    reweighted = list(analysis["weights"])
    if reweighted:
        fig, axes = plt.subplots(1, len(reweighted), figsize=(4.2 * len(reweighted), 3.4), squeeze=False, sharey=True)
        for ax, s in zip(axes.flat, reweighted):
            w = analysis["weights"][s]
            starts = np.array(w["window_starts"]) + cfg.weight_window / 2
            for d in domains:
                ax.plot(starts, w["weight_x_b_over_time"][d], label=d, ls="-" if d in clean else "--")
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.axvline(cfg.reweight_r_warmup_steps, color="red", ls=":", lw=0.8)
            ax.set(title=f"{LABELS.get(s, s)} (r = {w['r']:g})", xlabel="step")
        axes.flat[0].set_ylabel(f"mean weight × b ({cfg.weight_window}-step windows)")
        axes.flat[0].legend(fontsize=8)
        fig.tight_layout()
        plots["weights"] = f"{name}_weights.png"
        fig.savefig(out_dir / plots["weights"], dpi=100)
        plt.close(fig)
    return plots


# --- results page ------------------------------------------------------------------------------


def markdown_section(report: dict) -> str:
    """This experiment's block of docs/results.md, every number from `report`."""
    cfg, domains, clean = report["config"], report["domains"], report["clean_domains"]
    table, paired, weights = report["final_table"], report["paired_change_percent"], report["weights"]
    columns = [*domains, "mean"]
    seconds = list(report["run_seconds"].values())
    r_text = ", ".join(f"{LABELS.get(s, s)} {report['reweight'][s]['r']:g}" for s in cfg["strategies"] if s != "uniform")
    lines = [
        f"Command: `{report['command']}` ({report['date']}; {len(seconds)} runs, {np.mean(seconds):.0f} s each on average, "
        f"one thread per run, {report['jobs']} at a time, on a shared {report['machine']['cpus']}-core CPU).",
        "",
        (
            f"Model: {_model_text(cfg)}: {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, FFN "
            f"{cfg['ffn_hidden_size']}, {cfg['num_attention_heads']} heads in {cfg['num_query_groups']} KV group(s), sequence "
            f"{cfg['seq_length']}: {report['parameters'] / 1e6:.2f}M parameters; {cfg['train_iters']} steps of b = {cfg['batch_size']} sequences "
            f"({cfg['train_iters'] * cfg['batch_size'] * cfg['seq_length'] / 1e6:.2f}M tokens), one micro-batch per step, so each "
            f"step's weights span the whole batch; the preset's LR (cosine, linear warm-up {cfg['lr_warmup_iters']} steps) for "
            f"every strategy; r = {WARMUP_R:g} for the first {cfg['reweight_r_warmup_steps']} steps, then r = {r_text}; "
            f"seeds {', '.join(map(str, cfg['seeds']))} (within a seed every strategy has the same initialisation and data order). "
            f"Training blend: {report['blend']}. Validation: the first {cfg['eval_iters']} batches of {cfg['batch_size']} "
            f"sequences of each domain's held-out split, every {cfg['eval_interval']} steps; `mean` is the mean over "
            f"{', '.join(clean)}."
        ),
    ]
    if "spread" in report["plots"]:
        lines += ["", f"![Per-sample loss spread in the Uniform runs](results/{report['plots']['spread']})"]
    lines += [
        "",
        f"![Validation perplexity](results/{report['plots']['ppl']})",
        "",
        f"Final validation perplexity (step {cfg['train_iters']}), mean ± standard deviation over the {len(cfg['seeds'])} seeds:",
        "",
        "| strategy | " + " | ".join(c if c in clean or c == "mean" else f"{c} (not in mean)" for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for s, row in table.items():
        lines.append(f"| {LABELS.get(s, s)} | " + " | ".join(f"{row[c]['mean']:.2f} ± {row[c]['std']:.2f}" for c in columns) + " |")
    if paired:
        spread = report["uniform_seed_spread_percent"]
        lines += [
            "",
            (
                "Paired change of the final perplexity against Uniform with the same seed, in percent (< 0: better than "
                f"Uniform): mean ± standard deviation over seeds, and the mean column seed by seed. Uniform's own "
                f"seed-to-seed spread of the mean perplexity is {spread:.2f}% (standard deviation / mean). A difference "
                "\"exceeds the seed spread\" when it has the same sign on every seed and its mean is larger than that."
            ),
            "",
            "| strategy | " + " | ".join(columns) + " | mean, per seed | exceeds the seed spread |",
            "|---|" + "---|" * (len(columns) + 2),
        ]
        for s, change in paired.items():
            lines.append(
                f"| {LABELS.get(s, s)} | "
                + " | ".join(f"{change[c]['mean']:+.2f} ± {change[c]['std']:.2f}" for c in columns)
                + " | " + ", ".join(f"{v:+.2f}" for v in change["mean"]["per_seed"])
                + f" | {'yes' if change['exceeds_seed_spread'] else 'no'} |"
            )  # fmt: skip
    if weights:
        first = next(iter(weights.values()))
        lines += [
            "",
            f"![Weight per domain over time](results/{report['plots']['weights']})",
            "",
            (
                f"Weights after the r warm-up ({first['steps_after_warmup']} steps over all seeds): mean weight x b per domain "
                "(1 = uniform; < 1: down-weighted), the largest weight x b per step (Theorem 1 assumes at most 2: the bound paper 1 shows LinUpper "
                "keeping; Quadratic and Extremes are not built to keep it), and the "
                "effective sample fraction 1 / (b sum w²):"
            ),
            "",
            "| strategy | " + " | ".join(domains) + " | max w·b per step: median / max | steps with max w·b > 2 | effective sample fraction |",
            "|---|" + "---|" * (len(domains) + 3),
        ]
        for s, w in weights.items():
            lines.append(
                f"| {LABELS.get(s, s)} | "
                + " | ".join(f"{w['weight_x_b_after_warmup'][d]:.2f}" for d in domains)
                + f" | {w['max_weight_x_b_median']:.2f} / {w['max_weight_x_b_max']:.2f} | {w['steps_over_bound_2']} of {w['steps_after_warmup']}"
                f" | {w['effective_sample_fraction_mean']:.2f} |"
            )
    return "\n".join(lines)


def _model_text(cfg: dict) -> str:
    """Which preset the model is, and where it departs from the preset's shape."""
    from megatron_reweight.training.config import preset_config

    preset = preset_config(cfg["preset"]).model
    changed = [
        f"{name.replace('_', ' ')} {cfg[name]} (preset: {getattr(preset, name)})"
        for name in SHAPE
        if cfg[name] != getattr(preset, name)
    ]
    return f"the `{cfg['preset']}` preset" + (f" with {', '.join(changed)}" if changed else "")


def _blend_text(experiment: str, clean: list[str]) -> str:
    share = {"domains": 0.0, "noise": NOISE_SHARE, "redundancy": 1 / (len(clean) + 1)}[experiment]
    text = f"{', '.join(clean)} in equal shares"
    if experiment == "noise":
        text += f", plus `noise` ({share:.0%} of the samples): random token sequences with the clean documents' lengths"
    if experiment == "redundancy":
        text += f", plus `repeated` ({share:.0%} of the samples): the first {REPEATED_DOCUMENTS} documents of {clean[0]}, each {REPEATS} times"
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="domains", choices=list(EXPERIMENTS))
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, one thread each")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "runs" / "lm_experiments", help="controlled-domain data")
    parser.add_argument("--name", help="output file stem (default: tiny_lm_<experiment>)")
    for field in fields(LMConfig):
        if field.name not in ("experiment", "threads", "extra_args"):
            flag = "--" + field.name.replace("_", "-")
            default = getattr(LMConfig(), field.name)
            if isinstance(default, tuple):
                parser.add_argument(flag, nargs="+", type=type(default[0]))
            else:
                parser.add_argument(flag, type={"micro_batch_size": int, "audit_dir": str}.get(field.name, type(default)))
    parser.add_argument("--extra-args", default="", help="more pretrain_llama.py flags, quoted")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-config", help=argparse.SUPPRESS)
    parser.add_argument("--worker-data", help=argparse.SUPPRESS)
    return parser


def experiment_defaults(experiment: str) -> LMConfig:
    return replace(LMConfig(experiment=experiment), **EXPERIMENTS[experiment])


def config_from_args(args: argparse.Namespace) -> LMConfig:
    """The experiment's settings, with the ones given on the command line instead."""
    overrides = {
        f.name: tuple(value) if isinstance(value, list) else value
        for f in fields(LMConfig)
        if f.name not in ("experiment", "extra_args") and (value := getattr(args, f.name, None)) is not None
    }
    return replace(experiment_defaults(args.experiment), **overrides, extra_args=tuple(args.extra_args.split()))


def main() -> None:
    args = build_parser().parse_args()
    if args.worker:
        values = json.loads(args.worker_config)
        cfg = LMConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        worker(cfg, args.worker, args.worker_seed, json.loads(args.worker_data), args.worker_out)
        return

    cfg = config_from_args(args)
    name = args.name or f"tiny_lm_{args.experiment}"
    start = time.perf_counter()
    runs = sweep(cfg, args.out_dir / name, args.work_dir, args.jobs)
    clean = [d for d in next(iter(runs.values()))["domains"] if d not in CONTROLLED_DOMAINS]
    analysis = analyse(cfg, runs, clean)
    plots = plot(cfg, analysis, args.out_dir, name)

    command = f"python -m benchmarks.tiny_lm_domains --experiment {args.experiment} --jobs {args.jobs}"
    defaults = experiment_defaults(args.experiment)
    for field in fields(LMConfig):
        value = getattr(cfg, field.name)
        if field.name not in ("experiment", "threads", "audit_dir") and value != getattr(defaults, field.name):
            shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
            command += f" --{field.name.replace('_', '-')} " + (f"'{shown}'" if field.name == "extra_args" else str(shown))
    report = {
        "benchmark": name,
        "command": command,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "device": "cpu"},
        "sweep_seconds": round(time.perf_counter() - start, 1),
        "jobs": args.jobs,
        "config": asdict(cfg),
        "blend": _blend_text(cfg.experiment, clean),
        "plots": plots,
        **analysis,
    }
    path = args.out_dir / f"{name}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    if args.out_dir.resolve() == RESULTS_DIR:
        write_results_section(name, markdown_section(report), "tiny_lm_domains")

    for s, row in analysis["final_table"].items():
        change = analysis["paired_change_percent"].get(s)
        print(
            f"{s:10s} mean ppl {row['mean']['mean']:8.2f} ± {row['mean']['std']:.2f}"
            + (f" | vs Uniform {change['mean']['mean']:+.2f}% ± {change['mean']['std']:.2f}" if change else "")
        )
    for s, w in analysis["weights"].items():
        print(f"{s:10s} weight x b after warm-up: " + ", ".join(f"{d} {v:.2f}" for d, v in w["weight_x_b_after_warmup"].items()))
    print(f"wrote {path} and {', '.join(plots.values())}")


if __name__ == "__main__":
    main()
