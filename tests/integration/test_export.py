"""megatron-reweight-export: the tiny preset trained and saved at TP=1, at TP=2 x PP=2 and in
bf16, exported, and loaded with transformers' LlamaForCausalLM, gives megatron-core's logits
(to fp32 rounding) and its greedy generations (tests/workers/export_compare.py); then
lm-evaluation-harness runs the example task of examples/lm_eval on the export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.helpers import REPO
from tests.helpers.pretrain import run

COMPARE = REPO / "tests" / "integration" / "workers" / "export_compare.py"
TRAIN = ["--preset", "tiny", "--global-batch-size", "8", "--micro-batch-size", "2", "--eval-interval", "1000",
         "--eval-iters", "0", "--lr-warmup-iters", "2", "--reweight-r-warmup-steps", "2"]  # fmt: skip
LAYOUTS = {
    "TP1": (1, ["--train-iters", "20"]),
    "TP2xPP2": (4, ["--train-iters", "4", "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    "TP1 bf16": (1, ["--train-iters", "4", "--bf16"]),
}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _python(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **OFFLINE}
    result = subprocess.run(
        [sys.executable, *args], check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout
    )
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Train, save and export each layout once: {name: (checkpoint dir, export dir)}."""
    made = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in made:
            root = tmp_path_factory.mktemp(name.replace(" ", "_"))
            processes, layout = LAYOUTS[name]
            run(processes, TRAIN + layout + ["--save", str(root / "ckpt"), "--data-cache-path", str(root / "cache")])
            _python("-m", "megatron_reweight.export", "--load-dir", str(root / "ckpt"), "--save-dir", str(root / "hf"))
            made[name] = (root / "ckpt", root / "hf")
        return made[name]

    return get


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_exported_llama_gives_megatron_core_logits_and_generations(exported, name):
    checkpoint, hf = exported(name)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in hf.iterdir()
    }
    dtype = "bfloat16" if "bf16" in name else "float32"
    assert json.loads((hf / "config.json").read_text())["torch_dtype"] == dtype
    stored = "BF16" if "bf16" in name else "F32"
    with safe_open(hf / "model.safetensors", "pt") as weights:
        names = weights.keys()
        assert {str(weights.get_slice(key).get_dtype()) for key in names} == {stored}

    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    result = _python(str(COMPARE), "--checkpoint", str(checkpoint), "--exported", str(hf), "--vocab", str(vocab))
    assert "exported model matches megatron-core" in result.stdout
    numbers = json.loads(result.stdout.splitlines()[-2])
    print(name, numbers)
    assert numbers["max_abs_logit_difference"] < 1e-5
    assert numbers["greedy_tokens"] and all(numbers["greedy_tokens"])


def test_lm_eval_runs_the_example_task_on_the_export(exported, tmp_path):
    _, hf = exported("TP1")
    result = _python(
        "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={hf},dtype=float32", "--device", "cpu",
        "--include_path", "examples/lm_eval", "--tasks", "reweight_demo", "--batch_size", "8",
        "--output_path", str(tmp_path),
    )  # fmt: skip
    print(result.stdout)
    (results_file,) = tmp_path.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["n-samples"]["reweight_demo"]["effective"] == 24
    accuracy = results["results"]["reweight_demo"]["acc,none"]
    assert 0.0 <= accuracy <= 1.0
    assert "|reweight_demo|" in result.stdout
