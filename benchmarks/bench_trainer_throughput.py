"""Trainer throughput with and without reweighting: tokens/s of pretrain_llama.py.

Runs the real trainer (`pretrain_llama.py`, the `tiny` preset by default, on the offline
demo corpus) once per strategy and round, alternating the strategies (uniform, linupper,
uniform, linupper, ...) so that both see the same machine load, with the same seed and
data. Each run's first `--skip` steps (start-up, allocator warm-up) are dropped; a run's
throughput is tokens per step over its median step time (from the trainer's JSON-lines
metrics, one record per step; the median resists the spikes of a shared machine, the
mean-based figure is reported too). The ratio reported is the median over rounds of
linupper / uniform within a round.

    python -m benchmarks.bench_trainer_throughput --rounds 5      # 5 rounds x 40 steps, 1 process
    python -m benchmarks.bench_trainer_throughput --nproc 2 --out /tmp/tput.json
    python -m benchmarks.bench_trainer_throughput --extra-args "--mock-data --seq-length 256"
    python -m benchmarks.bench_trainer_throughput --preset llama-1.4b --train-iters 30 \
        --extra-args "--mock-data --num-layers 4 --global-batch-size 8"   # one GPU: cuda, bf16, TE
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.results_doc import REPO_ROOT as REPO
from benchmarks.results_doc import RESULTS_DIR, write_results_section
from megatron_reweight.launch import local_command

DEFAULT_OUT = RESULTS_DIR / "trainer_throughput.json"


def run_once(strategy: str, args: argparse.Namespace, metrics: Path) -> dict:
    flags = [
        "--preset", args.preset, "--train-iters", str(args.train_iters),
        "--log-interval", "1", "--eval-iters", "0", "--seed", "1234",
        "--reweight-strategy", strategy, "--metrics-file", str(metrics), *shlex.split(args.extra_args),
    ]  # fmt: skip
    command = local_command(args.nproc, [str(REPO / "pretrain_llama.py"), *flags])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(
            f"{strategy} run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    run = next(r for r in records if r["kind"] == "run")
    steps = [r for r in records if r["kind"] == "train" and r["iteration"] > args.skip]
    tokens_per_step = run["global_batch_size"] * run["seq_length"]
    median_step = statistics.median(r["step time s"] for r in steps)
    return {
        "strategy": strategy,
        "tokens_per_s": tokens_per_step / median_step,
        "tokens_per_s_mean_based": tokens_per_step * len(steps) / sum(r["step time s"] for r in steps),
        "median_step_s": median_step,
        "steps_timed": len(steps),
        "wall_s": time.perf_counter() - start,
        "final_lm_loss": steps[-1]["lm loss"],
        "parameters": run["parameters"],
        "device": f"{run['device']} {'bf16' if run['bf16'] else 'fp32'} {run['transformer_impl']}",
        "tokens_per_step": tokens_per_step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--strategies", nargs="+", default=["uniform", "linupper"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-iters", type=int, default=40)
    parser.add_argument("--skip", type=int, default=5, help="first steps of each run left out of the timing")
    parser.add_argument("--nproc", type=int, default=1, help="ranks (torchrun) per run: DP size")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="OMP threads in all, split over the ranks"
    )
    parser.add_argument("--extra-args", default="", help="more pretrain_llama.py flags, quoted")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="JSON of the runs and the summary (default docs/results/, which also updates "
                        "docs/results.md)")  # fmt: skip
    args = parser.parse_args()
    if args.skip >= args.train_iters:
        parser.error("--skip must be below --train-iters")
    args.threads = max(1, args.threads // args.nproc)

    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            # Alternate which strategy goes first, so neither always runs on a warmer machine.
            order = args.strategies if round_index % 2 == 0 else list(reversed(args.strategies))
            for strategy in order:
                record = run_once(strategy, args, Path(tmp) / f"{strategy}-{round_index}.jsonl")
                record["round"] = round_index
                runs.append(record)
                print(f"round {round_index} {strategy:>10}: {record['tokens_per_s']:9.0f} tokens/s "
                      f"(median step {record['median_step_s'] * 1e3:.1f} ms, final lm loss {record['final_lm_loss']:.4f})",
                      flush=True)  # fmt: skip

    baseline = args.strategies[0]
    summary = {}
    for strategy in args.strategies:
        mine = {r["round"]: r["tokens_per_s"] for r in runs if r["strategy"] == strategy}
        base = {r["round"]: r["tokens_per_s"] for r in runs if r["strategy"] == baseline}
        ratios = [mine[i] / base[i] for i in sorted(mine)]
        summary[strategy] = {
            "tokens_per_s_median": statistics.median(mine.values()),
            f"ratio_to_{baseline}_median": statistics.median(ratios),
            f"ratio_to_{baseline}_per_round": ratios,
        }
    print(f"\n{args.preset}, {args.nproc} rank(s) x {args.threads} thread(s), {args.train_iters} steps "
          f"({args.skip} skipped), {args.rounds} rounds, {runs[0]['tokens_per_step']} tokens/step:")  # fmt: skip
    for strategy, s in summary.items():
        print(f"  {strategy:>10}: {s['tokens_per_s_median']:9.0f} tokens/s (median)   "
              f"{strategy}/{baseline} = {s[f'ratio_to_{baseline}_median']:.3f} "
              f"(rounds: {', '.join(f'{r:.3f}' for r in s[f'ratio_to_{baseline}_per_round'])})")  # fmt: skip
    command = "python -m benchmarks.bench_trainer_throughput " + " ".join(sys.argv[1:])
    report = {
        "command": command.strip(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "config": vars(args) | {"out": str(args.out)},
        "runs": runs,
        "summary": summary,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    if args.out.resolve() == DEFAULT_OUT:
        write_results_section("trainer_throughput", markdown_section(report), "bench_trainer_throughput")


def markdown_section(report: dict) -> str:
    c, summary = report["config"], report["summary"]
    baseline = c["strategies"][0]
    rows = [f"| strategy | tokens/s (median over rounds) | / {baseline}, median | per round |", "|---|---|---|---|"]
    for strategy, s in summary.items():
        rounds = ", ".join(f"{r:.3f}" for r in s[f"ratio_to_{baseline}_per_round"])
        rows.append(f"| `{strategy}` | {s['tokens_per_s_median']:,.0f} | {s[f'ratio_to_{baseline}_median']:.3f} "
                    f"| {rounds} |")  # fmt: skip
    return (
        f"Command: `{report['command']}` ({report['date']}). `pretrain_llama.py --preset {c['preset']}` on "
        f"{report['runs'][0]['device']}, "
        f"{c['nproc']} rank(s) x {c['threads']} thread(s), {c['train_iters']} steps a run with the first "
        f"{c['skip']} left out, {c['rounds']} rounds alternating the order; tokens/s from each run's median "
        f"step time.\n\n" + "\n".join(rows)
    )


if __name__ == "__main__":
    main()
