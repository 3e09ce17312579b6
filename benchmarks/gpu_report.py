"""Tokens/s, MFU and reweighting overhead on a GPU, from the JSON that `scripts/gpu_check.sh`'s
runs write: `benchmarks/overhead.py --device cuda` (a plain megatron-core loop with Megatron's
own loss against each strategy, same model and batch) and `benchmarks/bench_trainer_throughput.py`
(`pretrain_llama.py` with and without reweighting, on the same shape).

MFU = model FLOPs per token x tokens/s / the GPU's peak dense bf16 FLOP/s, with the FLOPs of
Megatron-LM's own count: every matmul of the forward and backward pass (6 x parameters in
matmuls per token) plus the attention scores and weighted values over the full sequence, as
Megatron-LM counts them (12 x layers x sequence x hidden).

Run:  python -m benchmarks.gpu_report --overhead OVERHEAD.json --trainer TRAINER.json
Out:  docs/results/gpu_check.json and the gpu_check block of docs/results.md (or --out / --results-md)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.results_doc import RESULTS_DIR, RESULTS_MD, write_results_section

# Dense bf16 peak FLOP/s by device name (the first match wins; H100 PCIe before H100).
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100": 989.4e12,
    "H200": 989.4e12,
    "GH200": 989.4e12,
    "A100": 312e12,
}


def flops_per_token(shape: dict) -> float:
    """Training FLOPs per token of a Llama GPTModel (SwiGLU, GQA, untied output layer)."""
    h, layers, s = shape["hidden_size"], shape["num_layers"], shape["seq_length"]
    head_dim = h // shape["num_attention_heads"]
    attention = h * (h + 2 * shape["num_query_groups"] * head_dim) + h * h  # QKV and output projections
    mlp = 3 * h * shape["ffn_hidden_size"]  # gate, up and down projections
    matmul_parameters = layers * (attention + mlp) + h * shape["vocab_size"]
    return 6 * matmul_parameters + 12 * layers * s * h


def peak_flops(device: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    return next((peak for name, peak in PEAK_BF16_FLOPS.items() if name in device), None)


def build_report(overhead: dict, trainer: dict, peak_tflops: float | None) -> dict:
    run = next(r for r in overhead["runs"] if r["data_parallel_size"] == 1)
    shape = run["model_shape"]
    device = overhead["machine"]["device"]
    trainer_shape = trainer["runs"][0]
    tokens_per_step = run["micro_batch_size"] * run["num_microbatches"] * run["seq_length"]
    if trainer_shape["tokens_per_step"] != tokens_per_step:
        raise SystemExit(
            f"the trainer runs ({trainer_shape['tokens_per_step']} tokens/step) and the overhead run "
            f"({tokens_per_step} tokens/step) are not the same configuration"
        )
    flops = flops_per_token(shape)
    peak = peak_flops(device, peak_tflops)

    def entry(tokens_per_s: float) -> dict:
        return {"tokens_per_s": tokens_per_s, "mfu": flops * tokens_per_s / peak if peak else None}

    plain_step_s = run["variants"]["plain"]["step_ms_median"] / 1e3
    loops = {"megatron-core loop, Megatron's loss (plain)": entry(tokens_per_step / plain_step_s)}
    for variant, values in run["variants"].items():
        if variant not in ("plain", "plain-repeat"):
            loops[f"megatron-core loop, plugin `{variant}`"] = entry(tokens_per_step / (values["step_ms_median"] / 1e3))
    for strategy, summary in trainer["summary"].items():
        loops[f"pretrain_llama.py, `{strategy}`"] = entry(summary["tokens_per_s_median"])
    return {
        "benchmark": "gpu_check",
        "date": overhead["date"],
        "device": device,
        "trainer_device": trainer_shape["device"],
        "transformer_engine": run.get("transformer_engine"),
        "model_shape": shape,
        "parameters": run["parameters"],
        "tokens_per_step": tokens_per_step,
        "micro_batch_size": run["micro_batch_size"],
        "num_microbatches": run["num_microbatches"],
        "flops_per_token": flops,
        "peak_flops": peak,
        "throughput": loops,
        "step_ratio_to_plain": {v: e["step_ratio_to_plain"] for v, e in run["variants"].items() if v != "plain"},
        "rounds_kept": run["rounds_kept"],
        "trainer_ratio": {s: v for s, v in trainer["summary"].items()},
        "commands": [overhead["command"], trainer["command"]],
    }


def markdown_section(report: dict) -> str:
    shape = report["model_shape"]
    peak = report["peak_flops"]
    lines = [
        f"Commands: `{report['commands'][0]}` and `{report['commands'][1]}` ({report['date']}, {report['device']}; trainer: "
        f"{report['trainer_device']}).",
        "",
        (
            f"Model: a Llama GPTModel of {shape['num_layers']} layers (hidden {shape['hidden_size']}, FFN {shape['ffn_hidden_size']}, "
            f"{shape['num_attention_heads']} heads), vocabulary {shape['vocab_size']}, {report['parameters'] / 1e6:.0f}M parameters; "
            f"{report['num_microbatches']} micro-batches of {report['micro_batch_size']} x {shape['seq_length']} tokens per step at DP=1, "
            f"{'bf16' if report['device'] != 'cpu' else 'fp32'}, Transformer Engine {'on' if report['transformer_engine'] else 'off'}; "
            f"{report['flops_per_token'] / 1e9:.2f} GFLOP per token; "
            + (f"peak {peak / 1e12:.0f} TFLOP/s (dense bf16)." if peak else "no known peak for this device: MFU not computed.")
        ),
        "",
        "| loop | tokens/s | MFU |",
        "|---|---|---|",
    ]
    for name, values in report["throughput"].items():
        mfu = f"{100 * values['mfu']:.1f}%" if values["mfu"] is not None else "-"
        lines.append(f"| {name} | {values['tokens_per_s']:,.0f} | {mfu} |")
    lines += [
        "",
        f"Step time against the plain loop, paired per round ({report['rounds_kept']} rounds): median [IQR] (95% CI of the median):",
        "",
        "| loss function | step / plain |",
        "|---|---|",
    ]
    for variant, ratio in report["step_ratio_to_plain"].items():
        lines.append(
            f"| {variant} | {ratio['median']:.4f} [{ratio['iqr'][0]:.4f}, {ratio['iqr'][1]:.4f}] "
            f"({ratio['median_ci95'][0]:.4f}, {ratio['median_ci95'][1]:.4f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--overhead", type=Path, required=True, help="benchmarks/overhead.py's JSON (DP=1 run)")
    parser.add_argument("--trainer", type=Path, required=True, help="benchmarks/bench_trainer_throughput.py's JSON")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, if not in the table")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "gpu_check.json")
    parser.add_argument("--results-md", type=Path, default=RESULTS_MD, help="the page whose gpu_check block is rewritten")
    args = parser.parse_args()
    for path in (args.overhead, args.trainer):
        if not path.is_file():
            parser.error(f"{path}: no such file")
    report = build_report(json.loads(args.overhead.read_text()), json.loads(args.trainer.read_text()), args.peak_tflops)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    section = markdown_section(report)
    write_results_section("gpu_check", section, "gpu_report", path=args.results_md)
    print(section)


if __name__ == "__main__":
    main()
