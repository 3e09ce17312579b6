"""What `megatron-reweight-prepare` prints when the input is bad: the error, not the noise before it."""

from __future__ import annotations

import os
import subprocess
import sys
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

REPO = Path(__file__).resolve().parents[2]


def _write_tokenizer(path: Path) -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet)
    tokenizer.train_from_iterator(["some text to learn merges from"] * 10, trainer)
    tokenizer.save(str(path))


def test_a_corrupt_jsonl_is_one_error_line(tmp_path):
    _write_tokenizer(tmp_path / "tokenizer.json")
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


def _without_root_powers() -> list[str]:
    """A command prefix under which root, too, obeys folder permissions (root writes anywhere)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv (util-linux) to drop the capability to write anywhere")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


@pytest.mark.parametrize("missing", [False, True], ids=["read-only-folder", "inside-read-only-folder"])
def test_read_only_output_folder_is_one_error_line(tmp_path, missing):
    """Issue: a PermissionError traceback from the folder lock (or the mkdir)."""
    _write_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "input.jsonl").write_text('{"text": "a good row"}\n')
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    output = locked / "out" if missing else locked
    result = subprocess.run(
        [*_without_root_powers(), sys.executable, "-m", "megatron_reweight.data.prepare", "--input",
         str(tmp_path / "input.jsonl"), "--no-progress", "--tokenizer", str(tmp_path / "tokenizer.json"),
         "--output-dir", str(output)],
        cwd=REPO, env={"PYTHONPATH": str(REPO)}, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    expected = (
        f"error: --output-dir {output}: cannot create it (Permission denied); choose a folder you can write to"
        if missing
        else f"error: --output-dir {output} is not writable (its permissions or a read-only file system); "
        "choose a folder you can write to, or make it writable"
    )
    assert result.stderr.splitlines() == [expected]
