"""benchmarks/gpu_report.py's arithmetic and scripts/gpu_check.sh's argument checks, on the CPU.

The GPU runs themselves need a GPU (`scripts/gpu_check.sh`); `--dry-run` runs them on a CPU."""

import subprocess
from pathlib import Path

import pytest

from benchmarks import gpu_report

REPO = Path(__file__).resolve().parents[2]
LLAMA2_7B = {
    "num_layers": 32, "hidden_size": 4096, "ffn_hidden_size": 11008, "num_attention_heads": 32,
    "num_query_groups": 32, "seq_length": 4096, "vocab_size": 32000,
}  # fmt: skip


def test_flops_per_token_counts_every_matmul_parameter_of_llama2_7b():
    # Llama-2-7B has 6,738,415,616 parameters; all but the input embedding (32000 x 4096) and
    # the RMSNorm weights (2 per layer and a final one, 4096 each) sit in matmuls.
    matmul_parameters = 6_738_415_616 - 32000 * 4096 - (2 * 32 + 1) * 4096
    attention = 12 * 32 * 4096 * 4096
    assert gpu_report.flops_per_token(LLAMA2_7B) == 6 * matmul_parameters + attention


def test_grouped_query_attention_shrinks_only_the_kv_projections():
    grouped = dict(LLAMA2_7B, num_query_groups=8)
    head_dim = 4096 // 32
    saved = 32 * 4096 * 2 * (32 - 8) * head_dim  # K and V of 24 fewer groups, every layer
    assert gpu_report.flops_per_token(LLAMA2_7B) - gpu_report.flops_per_token(grouped) == 6 * saved


def test_report_tokens_per_second_and_mfu():
    shape = dict(LLAMA2_7B, num_layers=2, seq_length=1024)
    ratio = {"median": 1.01, "iqr": [1.0, 1.02], "median_ci95": [1.0, 1.02]}
    overhead = {
        "date": "2026-01-01",
        "command": "python -m benchmarks.overhead --device cuda",
        "machine": {"device": "NVIDIA H100 80GB HBM3"},
        "runs": [{
            "data_parallel_size": 1, "micro_batch_size": 2, "num_microbatches": 4, "seq_length": 1024,
            "model_shape": shape, "parameters": 10**9, "transformer_engine": True, "rounds_kept": 20,
            "variants": {
                "plain": {"step_ms_median": 500.0},
                "plain-repeat": {"step_ms_median": 501.0, "step_ratio_to_plain": ratio},
                "linupper": {"step_ms_median": 505.0, "step_ratio_to_plain": ratio},
            },
        }],
    }  # fmt: skip
    trainer = {
        "command": "python -m benchmarks.bench_trainer_throughput",
        "runs": [{"tokens_per_step": 8192, "device": "cuda bf16 transformer_engine"}],
        "summary": {"uniform": {"tokens_per_s_median": 16000.0}, "linupper": {"tokens_per_s_median": 15800.0}},
    }
    report = gpu_report.build_report(overhead, trainer, None)
    plain = report["throughput"]["megatron-core loop, Megatron's loss (plain)"]
    assert plain["tokens_per_s"] == pytest.approx(8192 / 0.5)
    assert report["peak_flops"] == 989.4e12  # H100 SXM, dense bf16
    assert plain["mfu"] == pytest.approx(gpu_report.flops_per_token(shape) * 8192 / 0.5 / 989.4e12)
    assert report["throughput"]["pretrain_llama.py, `linupper`"]["tokens_per_s"] == 15800.0
    assert "| linupper | 1.0100" in gpu_report.markdown_section(report)
    trainer["runs"][0]["tokens_per_step"] = 4096
    with pytest.raises(SystemExit, match="not the same configuration"):
        gpu_report.build_report(overhead, trainer, None)


def test_h100_pcie_is_not_taken_for_sxm():
    assert gpu_report.peak_flops("NVIDIA H100 PCIe", None) == 756e12
    assert gpu_report.peak_flops("Intel CPU", None) is None
    assert gpu_report.peak_flops("Intel CPU", 2.0) == 2e12


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--layers", "x"], "--layers needs a positive integer"), (["--bogus"], "unknown argument '--bogus'")],
)
def test_gpu_check_refuses_bad_arguments(args, message):
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), *args], capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr
