"""Data preparation under faults: a merge killed (SIGKILL) at any point, two preparations into one
folder, a lock left behind by a killed run. Each fault runs in a forked process; the reference is
an uninterrupted run into another folder."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sysconfig
from collections.abc import Callable
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

import megatron_reweight.data.indexed as indexed
import megatron_reweight.data.prepare as prepare_module
from megatron_reweight.data.errors import DataPrepError
from megatron_reweight.data.prepare import OutputConfig, OutputDirectory, PrepareConfig, TokenizerConfig, prepare
from megatron_reweight.data.sources import InputConfig

DOMAINS = ("web", "code", "books")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[list[str], Path]:
    """Three jsonl files of standard-library text in three domains, and a small BPE tokenizer."""
    folder = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [path.read_text(encoding="utf-8", errors="replace")[:4000] for path in sorted(stdlib.glob("*.py"))[:60]]
    files = []
    for part in range(3):
        files.append(str(folder / f"part-{part}.jsonl"))
        with open(files[-1], "w", encoding="utf-8") as file:
            for index in range(part, len(texts), 3):
                file.write(json.dumps({"text": texts[index], "domain": DOMAINS[index % 3]}) + "\n")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    return files, folder / "tokenizer.json"


def run_config(corpus, output_dir: Path) -> PrepareConfig:
    files, tokenizer = corpus
    return PrepareConfig(
        InputConfig(files=files, domain_field="domain"),
        TokenizerConfig(str(tokenizer)),
        OutputConfig(output_dir=output_dir, merge_shards=True),
        progress=False,
    )


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict[str, bytes]:
    output_dir = tmp_path_factory.mktemp("reference")
    prepare(run_config(corpus, output_dir))
    return directory_bytes(output_dir)


def directory_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under the folder (hidden ones too), data_path.txt with the folder's path replaced."""
    files = {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}
    files["data_path.txt"] = files["data_path.txt"].replace(str(folder).encode(), b"OUT")
    return files


def kill_on_call(owner, name: str, call: int) -> None:
    """SIGKILL this process when `owner.name` is called for the `call`-th time."""
    original, calls = getattr(owner, name), 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == call:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def on_first_call(owner, name: str, action: Callable[[], None]) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        setattr(owner, name, original)
        action()
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def in_child(work: Callable[[], None]) -> int:
    """Run `work` in a forked process; its pid. The child never returns into pytest."""
    pid = os.fork()
    if pid == 0:
        try:
            work()
        finally:
            os._exit(0)
    return pid


def prepare_killed(config: PrepareConfig, arm: Callable[[], None]) -> None:
    pid = in_child(lambda: (arm(), prepare(config)))
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the run finished before the kill"


MERGE_KILL_POINTS = {
    "inside the first domain's merge": lambda: kill_on_call(indexed.IndexedDatasetBuilder, "add_index", 2),
    "between a merged .bin and its .idx": lambda: on_first_call(
        prepare_module, "merge", lambda: kill_on_call(indexed, "sync_file", 2)
    ),
    "after the first domain's merge": lambda: kill_on_call(prepare_module, "merge", 2),
    "after summary.json, before cleaning up": lambda: kill_on_call(OutputDirectory, "remove_work_files", 1),
    "while removing the merged shards": lambda: kill_on_call(prepare_module, "remove_dataset", 2),
}


@pytest.mark.parametrize("point", MERGE_KILL_POINTS)
def test_merge_killed_then_rerun_is_byte_identical(point, corpus, reference, tmp_path):
    config = run_config(corpus, tmp_path)
    prepare_killed(config, MERGE_KILL_POINTS[point])
    prepare(config)
    assert directory_bytes(tmp_path) == reference


def test_concurrent_prepare_into_one_folder_is_refused_naming_the_lock_holder(corpus, reference, tmp_path):
    config = run_config(corpus, tmp_path)
    started_read, started_write = os.pipe()
    go_read, go_write = os.pipe()

    def hold_at_start():
        def wait(self, original=OutputDirectory.start):
            os.write(started_write, b"1")
            os.read(go_read, 1)
            original(self)

        OutputDirectory.start = wait
        prepare(config)

    first = in_child(hold_at_start)
    os.read(started_read, 1)
    try:
        with pytest.raises(DataPrepError, match=rf"PID {first} on host {socket.gethostname()}.*wait for it"):
            prepare(config)
    finally:
        os.write(go_write, b"1")
        _, status = os.waitpid(first, 0)
    assert os.WIFEXITED(status)
    assert directory_bytes(tmp_path) == reference  # the refused run touched nothing of the first one


def test_lock_of_a_killed_prepare_is_stale_and_taken_over(corpus, reference, tmp_path, caplog):
    config = run_config(corpus, tmp_path)
    killed = in_child(lambda: (kill_on_call(OutputDirectory, "start", 1), prepare(config)))
    _, status = os.waitpid(killed, 0)
    assert os.WIFSIGNALED(status)
    with caplog.at_level(logging.WARNING):
        prepare(config)
    assert f"PID {killed} on host {socket.gethostname()}" in caplog.text and "stale" in caplog.text
    assert directory_bytes(tmp_path) == reference
