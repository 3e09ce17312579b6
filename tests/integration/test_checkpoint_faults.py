"""Checkpoints under faults. One trainer run saves every 2 steps and is SIGKILLed after its
second checkpoint; the tests then look at what it left behind."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.helpers.pretrain import SMALL_MODEL, _env, command, data_args, make_corpus, read_metrics, run


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


@pytest.fixture
def checkpoints(killed_run, tmp_path) -> Path:
    """A private copy of the killed run's checkpoints (iterations 2 and 4, maybe an .incomplete 6)."""
    copy = tmp_path / "ckpt"
    shutil.copytree(killed_run["ckpt"], copy)
    (copy / "latest_checkpointed_iteration.txt").write_text("4")
    return copy


def resume(killed_run, ckpt: Path, *extra: str, check: bool = True):
    args = SMALL_MODEL + data_args(killed_run["corpus"], killed_run["root"] / "cache") + [
        "--train-iters", "1000", "--eval-iters", "0", "--log-interval", "1", "--save", str(ckpt), "--load", str(ckpt),
        "--save-interval", "2", *extra,
    ]  # fmt: skip
    return run(1, args, check=check)


def error_line(result) -> str:
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stderr.strip().splitlines()[-1]


def test_checksum_names_every_damaged_file_and_the_checkpoint_to_fall_back_to(killed_run, checkpoints):
    damaged = checkpoints / "iter_0000004"
    shards = sorted(path.name for path in damaged.glob("*.distcp"))
    with open(damaged / shards[0], "r+b") as file:  # plausible values: bytes of the same file, moved
        file.seek(4096)
        block = file.read(64)
        file.seek(8192)
        file.write(block)
    os.truncate(damaged / shards[-1], (damaged / shards[-1]).stat().st_size // 2)
    (damaged / "common.pt").unlink()

    line = error_line(resume(killed_run, checkpoints, check=False))
    assert line.startswith(f"pretrain_llama.py: error: --load {checkpoints}: the checkpoint of iteration 4 is damaged")
    assert f"{shards[0]} differs from the saved file (checksum mismatch)" in line
    assert f"{shards[-1]} has " in line and "common.pt is missing" in line
    assert line.endswith("complete checkpoints: iteration 2; load one with --ckpt-step 2")

    # The named fallback works: iteration 3 from checkpoint 2 has the uninterrupted run's loss.
    resumed = resume(killed_run, checkpoints, "--ckpt-step", "2", "--exit-interval", "3")
    assert f"resumed from {checkpoints / 'iter_0000002'} (iteration 2, 16 samples)" in resumed.stdout
    original, _ = read_metrics(killed_run["ckpt"] / "metrics.jsonl")
    again, _ = read_metrics(checkpoints / "metrics.jsonl")
    assert again[3]["lm loss"] == pytest.approx(original[3]["lm loss"], rel=1e-6)


def test_truncated_checkpoint_without_checksums_is_one_clear_error(killed_run, checkpoints):
    """A checkpoint saved without checksums (--no-ckpt-checksums, or by an older version): the
    reader's own exception becomes the error, with the iteration and the fallback."""
    damaged = checkpoints / "iter_0000004"
    (damaged / "checksums.json").unlink()
    os.truncate(damaged / "common.pt", 100)
    line = error_line(resume(killed_run, checkpoints, check=False))
    expected = f"pretrain_llama.py: error: --load {checkpoints}: the checkpoint of iteration 4 cannot be read ("
    assert line.startswith(expected)
    assert line.endswith("complete checkpoints: iteration 2; load one with --ckpt-step 2")


def test_resume_with_another_train_iters_is_refused_as_megatron_does(killed_run, checkpoints):
    args = ("--train-iters", "500")
    line = error_line(resume(killed_run, checkpoints, *args, check=False))
    assert "the learning-rate schedule differs from the checkpoint's" in line
    assert "--train-iters 1000 in the checkpoint, 500 now" in line and "--override-opt-param-scheduler" in line

    kept = resume(killed_run, checkpoints, *args, "--use-checkpoint-opt-param-scheduler", "--exit-interval", "5")
    assert f"resumed from {checkpoints / 'iter_0000004'}" in kept.stdout
    # Megatron's cosine decay over the checkpoint's 1000 iterations (not 500), after 2 warm-up ones, at 5.
    progress = (5 - 2) / (1000 - 2)
    expected = 3e-4 + (3e-3 - 3e-4) * 0.5 * (math.cos(math.pi * progress) + 1)
    assert read_metrics(checkpoints / "metrics.jsonl")[0][5]["lr"] == pytest.approx(expected, rel=1e-9)
