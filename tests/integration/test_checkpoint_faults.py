"""Checkpoints under faults. One trainer run saves every 2 steps and is SIGKILLed after its
second checkpoint; the tests then look at what it left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.helpers.pretrain import SMALL_MODEL, _env, command, data_args, make_corpus


def processes_with(marker: str) -> dict[int, str]:
    """Command lines of the live processes whose environment holds `marker`, by PID."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "environ").read_bytes():
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited meanwhile, or not ours to read
            pass
    return found


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("killed_run")
    corpus = make_corpus(root / "corpus")
    ckpt = root / "ckpt"
    args = SMALL_MODEL + data_args(corpus, root / "cache") + [
        "--train-iters", "1000", "--eval-iters", "0", "--log-interval", "1", "--save", str(ckpt),
        "--save-interval", "2",
    ]  # fmt: skip
    marker = f"CHECKPOINT_FAULTS_{uuid.uuid4().hex}"
    process = subprocess.Popen(
        command(1, args), env={**_env(), marker: "1"}, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    deadline = time.monotonic() + 600
    try:
        while not (tracker.exists() and int(tracker.read_text()) >= 4):
            assert process.poll() is None, process.stderr.read().decode()[-5000:]
            assert time.monotonic() < deadline, "no second checkpoint within 600 s"
            time.sleep(0.1)
        helpers_while_running = [line for line in processes_with(marker).values() if "pretrain_llama.py" not in line]
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    return {"corpus": corpus, "ckpt": ckpt, "root": root, "marker": marker, "helpers": helpers_while_running}


def test_no_checkpoint_helper_process_outlives_a_sigkilled_trainer(killed_run):
    assert killed_run["helpers"], "the save started no helper process: nothing was tested"
    deadline = time.monotonic() + 20
    while (left := processes_with(killed_run["marker"])) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:  # leave the machine clean even when the assertion fails
        os.kill(pid, signal.SIGKILL)
    assert not left, f"still alive 20 s after the trainer's SIGKILL: {list(left.values())}"
