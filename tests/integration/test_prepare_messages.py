"""What `megatron-reweight-prepare` prints when the input is bad: the error, not the noise before it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

REPO = Path(__file__).resolve().parents[2]


def test_a_corrupt_jsonl_is_one_error_line(tmp_path):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet)
    tokenizer.train_from_iterator(["some text to learn merges from"] * 10, trainer)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text('{"text": "a good row"}\n{"text": "a row cut o\n')

    result = subprocess.run(
        [sys.executable, "-m", "megatron_reweight.data.prepare", "--input", str(corrupt), "--no-progress",
         "--tokenizer", str(tmp_path / "tokenizer.json"), "--output-dir", str(tmp_path / "out")],
        cwd=REPO, env={"PYTHONPATH": str(REPO)}, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    backend, error = result.stderr.splitlines()  # which tokenizer backend runs, then the error
    assert backend.startswith("tokenizing with")
    assert error.startswith(f"error: cannot read {corrupt}: ArrowInvalid: JSON parse error")
