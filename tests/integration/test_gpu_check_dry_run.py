"""scripts/gpu_check.sh --dry-run: every step of the GPU check on the CPU at a tiny size (the
GPU run itself needs a GPU). The rendered table must carry the measured numbers: tokens/s from
the two benchmarks' own JSON, and MFU = tokens/s x FLOPs per token / peak."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import REPO


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_report_carries_both_benchmarks_numbers(dry_run):
    report = json.loads((dry_run / "gpu_check.json").read_text())
    trainer = json.loads((dry_run / "trainer_throughput.json").read_text())["summary"]
    overhead = json.loads((dry_run / "overhead.json").read_text())["runs"][0]
    step_tokens = overhead["micro_batch_size"] * overhead["num_microbatches"] * overhead["seq_length"]
    expected_tokens_per_s = {
        f"pretrain_llama.py, `{strategy}`": trainer[strategy]["tokens_per_s_median"] for strategy in ("uniform", "linupper")
    }
    expected_tokens_per_s["megatron-core loop, Megatron's loss (plain)"] = 1e3 * step_tokens / overhead["variants"]["plain"]["step_ms_median"]
    for strategy in ("uniform", "linupper"):
        expected_tokens_per_s[f"megatron-core loop, plugin `{strategy}`"] = (
            1e3 * step_tokens / overhead["variants"][strategy]["step_ms_median"]
        )
    assert set(report["throughput"]) == set(expected_tokens_per_s)
    for loop, tokens_per_s in expected_tokens_per_s.items():
        measured = report["throughput"][loop]
        assert measured["tokens_per_s"] == pytest.approx(tokens_per_s, rel=1e-9), loop
        assert measured["mfu"] == pytest.approx(tokens_per_s * report["flops_per_token"] / report["peak_flops"], rel=1e-9)


def test_dry_run_renders_its_own_results_page(dry_run):
    page = (dry_run / "results.md").read_text()
    report = json.loads((dry_run / "gpu_check.json").read_text())
    assert page.startswith("<!-- gpu_check:begin")
    for loop, measured in report["throughput"].items():
        assert f"| {loop} | {measured['tokens_per_s']:,.0f} | {100 * measured['mfu']:.1f}% |" in page
