"""benchmarks/bench_prepare.py at smoke size against Megatron-LM's real tools/preprocess_data.py
(the checkout in MEGATRON_LM_PATH): both tools run on the same documents, and their outputs must
be the same bytes at 1 and 2 workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

MEGATRON_LM = os.environ.get("MEGATRON_LM_PATH")
DOCUMENTS_PER_DOMAIN = 10

pytestmark = pytest.mark.skipif(
    not (MEGATRON_LM and Path(MEGATRON_LM, "tools", "preprocess_data.py").is_file()),
    reason="set MEGATRON_LM_PATH to a Megatron-LM checkout with tools/preprocess_data.py",
)


def test_pipeline_and_megatron_lm_tool_write_the_same_dataset(tmp_path):
    output = tmp_path / "bench_prepare.json"
    command = [
        sys.executable, "-m", "benchmarks.bench_prepare", "--megatron-lm", MEGATRON_LM, "--documents",
        str(DOCUMENTS_PER_DOMAIN), "--copies", "1", "--repeats", "1", "--output", str(output),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    corpus = report["corpus"]
    assert corpus["documents"] == DOCUMENTS_PER_DOMAIN * len(corpus["domains"])
    # [.bin identical, .idx identical] for each worker count of the tool
    assert report["megatron_lm_output_identical"] == {
        f"megatron_lm_{n}_workers": [True, True] for n in sorted({1, len(os.sched_getaffinity(0))})
    }
    for name, measured in report["results"].items():
        assert measured["tokens_per_cpu_s"] > 0, name
