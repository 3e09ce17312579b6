"""The cost of the weight audit (--reweight-audit-dir) on a training step.

Runs the real trainer (`pretrain_llama.py`'s code, the `tiny` preset on the offline demo corpus)
at DP=2 under torchrun, alternating runs with and without the audit, same seed and data. Two
measurements:
* accounted: in the audited runs, the time the writing rank spends in the audit (collecting each
  step's windows, and each flush: the document lookup, the Parquet file, its fsync and rename),
  per step, against that run's step time. The writer is on the step's critical path (the other
  rank waits for it at the next collective), so this is the audit's share of a step;
* paired: the median step time with the audit over the one without, per round (the machine's
  noise shows in the spread over rounds).
The audit flushes at each log step (here every 10 steps, the preset's --log-interval).

    python -m benchmarks.audit_cost                       (3 rounds of 2 x 100 steps, ~5 min on 2 cores)
Out:  docs/results/audit_cost.json and the audit_cost block of docs/results.md
"""

from __future__ import annotations

import argparse
import json
import os
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

DEFAULT_OUT = RESULTS_DIR / "audit_cost.json"


def worker(flags: list[str], timings_out: Path) -> None:
    """One rank of a run: the trainer, with the audit writer's methods timed."""
    from megatron_reweight.audit import writer
    from megatron_reweight.training import parse_config, train

    spent = {"add_step": 0.0, "flush": 0.0, "flushes": 0}

    def timed(name, method):
        def wrapped(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
                spent["flushes"] += name == "flush"

        return wrapped

    writer.AuditWriter.add_step = timed("add_step", writer.AuditWriter.add_step)
    writer.AuditWriter.flush = timed("flush", writer.AuditWriter.flush)
    train(parse_config(flags))
    if int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1:  # the writing rank
        timings_out.write_text(json.dumps(spent))


def run_once(audit: bool, args, tmp: Path, index: int) -> dict:
    metrics, timings = tmp / f"m{index}.jsonl", tmp / f"t{index}.json"
    flags = [
        "--preset", "tiny", "--train-iters", str(args.train_iters), "--eval-iters", "0", "--seed", "1234",
        "--device", "cpu", "--metrics-file", str(metrics),
        *(["--reweight-audit-dir", str(tmp / f"audit{index}")] if audit else []),
    ]  # fmt: skip
    command = local_command(args.nproc, [str(Path(__file__).resolve()), "--worker", json.dumps(flags), str(timings)])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    run = next(r for r in records if r["kind"] == "run")
    logged = [r for r in records if r["kind"] == "train"]
    intervals = [r["step time s"] for r in logged[1:]]  # the first interval holds the start-up
    record = {
        "audit": audit,
        "median_step_s": statistics.median(intervals),
        "mean_step_s": statistics.mean(intervals),
        "steps": logged[-1]["iteration"],
        "dp": run["dp"],
        "num_microbatches": run["num_microbatches"],
        "parameters": run["parameters"],
        "seq_length": run["seq_length"],
        "global_batch_size": run["global_batch_size"],
        "micro_batch_size": run["micro_batch_size"],
        "log_interval": logged[1]["iteration"] - logged[0]["iteration"],
    }
    if audit:
        spent = json.loads(timings.read_text())
        per_step = (spent["add_step"] + spent["flush"]) / record["steps"]
        record.update(spent, audit_s_per_step=per_step, audit_share_of_step=per_step / record["mean_step_s"])
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-iters", type=int, default=100)
    parser.add_argument("--nproc", type=int, default=2, help="ranks: the DP size")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker[0]), Path(args.worker[1]))
        return

    start, load_before = time.perf_counter(), os.getloadavg()[0]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for audit in (True, False) if round_index % 2 == 0 else (False, True):
                record = run_once(audit, args, Path(tmp), len(runs))
                runs.append({**record, "round": round_index})
                print(f"round {round_index} audit {audit!s:5}: median step {record['median_step_s'] * 1e3:.1f} ms"
                      + (f", audit {record['audit_s_per_step'] * 1e3:.2f} ms/step "
                         f"({100 * record['audit_share_of_step']:.2f}%)" if audit else ""), flush=True)  # fmt: skip
    audited = [r for r in runs if r["audit"]]
    ratios = [
        next(r for r in runs if r["audit"] and r["round"] == i)["median_step_s"]
        / next(r for r in runs if not r["audit"] and r["round"] == i)["median_step_s"]
        for i in range(args.rounds)
    ]
    report = {
        "command": "python -m benchmarks.audit_cost " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "seconds": round(time.perf_counter() - start),
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "cpus": os.cpu_count(),
        "runs": runs,
        "audit_share_of_step": [r["audit_share_of_step"] for r in audited],
        "audit_ms_per_step": [1e3 * r["audit_s_per_step"] for r in audited],
        "flush_ms": [1e3 * r["flush"] / r["flushes"] for r in audited],
        "step_ratio_per_round": ratios,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    if args.out.resolve() == DEFAULT_OUT:
        write_results_section("audit_cost", markdown_section(report), "audit_cost")
    print(markdown_section(report))


def markdown_section(report: dict) -> str:
    first = report["runs"][0]
    share, ms, flush = report["audit_share_of_step"], report["audit_ms_per_step"], report["flush_ms"]
    ratios = report["step_ratio_per_round"]
    return (
        f"Command: `{report['command'].strip()}` ({report['date']}, {report['seconds']} s on a shared "
        f"{report['cpus']}-core CPU, 1-minute load average {report['load_average'][0]} before and "
        f"{report['load_average'][1]} after). `pretrain_llama.py --preset tiny` ({first['parameters'] / 1e6:.2f}M "
        f"parameters, sequence {first['seq_length']}), DP={first['dp']} (one thread per rank), global batch "
        f"{first['global_batch_size']} = micro-batch {first['micro_batch_size']} x DP x {first['num_microbatches']}, "
        f"{first['steps']} steps a run, the audit flushed every {first['log_interval']} steps; "
        f"{len(ratios)} rounds alternating runs with and without the audit.\n\n"
        "| measure | per round | median |\n|---|---|---|\n"
        f"| audit time on the writing rank, ms per step | {', '.join(f'{v:.2f}' for v in ms)} | {statistics.median(ms):.2f} |\n"
        f"| its share of the audited run's step | {', '.join(f'{100 * v:.2f}%' for v in share)} | "
        f"{100 * statistics.median(share):.2f}% |\n"
        f"| one flush (document lookup, Parquet, fsync, rename), ms | {', '.join(f'{v:.1f}' for v in flush)} | "
        f"{statistics.median(flush):.1f} |\n"
        f"| median step with / without the audit | {', '.join(f'{v:.3f}' for v in ratios)} | "
        f"{statistics.median(ratios):.3f} |"
    )


if __name__ == "__main__":
    main()
