"""Stop signals as a cluster and a terminal send them: SIGTERM to every process of the run
(Slurm's preemption, scancel) and Ctrl-C (SIGINT to the terminal's foreground process group),
on one process and under torchrun. The save they trigger completes and resumes exactly."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.helpers.pretrain import SMALL_MODEL, data_args, make_corpus, popen, read_metrics, run

ITERS = 30  # far more than the signalled runs reach before their signal (steps take tens of ms)
COMMON = ["--train-iters", str(ITERS), "--log-interval", "1", "--eval-iters", "0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    """The train records of an uninterrupted run, by rank count (made on first use)."""
    records = {}

    def get(nproc: int) -> dict[int, dict]:
        if nproc not in records:
            root = tmp_path_factory.mktemp(f"reference{nproc}")
            metrics = root / "metrics.jsonl"
            run(nproc, SMALL_MODEL + data_args(corpus, root / "cache") + COMMON + ["--metrics-file", str(metrics)])
            records[nproc] = read_metrics(metrics)[0]
        return records[nproc]

    return get


def _signal_after(process: subprocess.Popen, metrics, iterations: int, number: int, ready=lambda: True) -> None:
    """Send `number` to the run's whole process group once `iterations` steps are logged and `ready()`."""
    deadline = time.time() + 240
    while not (metrics.exists() and len(read_metrics(metrics)[0]) >= iterations and ready()):
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "the run did not get going"
        time.sleep(0.05)
    os.killpg(process.pid, number)  # popen starts the run in a process group of its own


def _finish(process: subprocess.Popen) -> tuple[str, str]:
    try:
        return process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def _assert_same_trajectory(resumed: dict[int, dict], reference: dict[int, dict], iterations) -> None:
    for iteration in iterations:
        for key in ("lm loss", "weighted loss", "grad norm", "lr", "consumed_samples"):
            assert resumed[iteration][key] == pytest.approx(reference[iteration][key], rel=1e-6, abs=1e-7), (
                iteration,
                key,
            )


def _rank_lines(stderr: str) -> list[str]:
    """What the ranks wrote to stderr, without torchrun's own report of the signal it got."""
    return [line for line in stderr.splitlines() if line.strip() and "torch/distributed/elastic" not in line
            and not line.startswith((" ", "Traceback", "torch.distributed.elastic", "During handling"))]  # fmt: skip


@pytest.mark.parametrize("nproc", [1, 2], ids=["one-process", "torchrun-2-ranks"])
def test_sigterm_to_the_process_group_after_a_save_completes_the_save_and_resumes_exactly(
    corpus, uninterrupted, tmp_path, nproc
):
    """Issue: the signal also killed megatron-core's checkpoint-writer helper (started at the first
    save), so the save it triggers failed with BrokenPipeError and left iter_N.incomplete."""
    ckpt, data = tmp_path / "ckpt", data_args(corpus, tmp_path / "cache")
    process = popen(nproc, SMALL_MODEL + data + COMMON + ["--save", str(ckpt), "--save-interval", "2"])
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    _signal_after(process, ckpt / "metrics.jsonl", 3, signal.SIGTERM, ready=tracker.exists)
    stdout, stderr = _finish(process)

    saved = int(tracker.read_text())
    assert 3 <= saved < ITERS, stdout[-3000:] + stderr[-5000:]
    assert f"exiting at iteration {saved}: received SIGTERM; checkpoint {ckpt / f'iter_{saved:07d}'}" in stdout
    assert not list(ckpt.glob("*.incomplete")), stderr[-5000:]
    if nproc == 1:  # torchrun itself ends non-zero with a traceback of the signal it got
        assert process.returncode == 0, stderr[-5000:]

    metrics = tmp_path / "resumed.jsonl"
    resumed = run(nproc, SMALL_MODEL + data + COMMON + ["--load", str(ckpt), "--metrics-file", str(metrics)])
    assert f"resumed from {ckpt / f'iter_{saved:07d}'}" in resumed.stdout
    _assert_same_trajectory(read_metrics(metrics)[0], uninterrupted(nproc), range(saved + 1, ITERS + 1))


@pytest.mark.parametrize("nproc", [1, 2], ids=["one-process", "torchrun-2-ranks"])
def test_ctrl_c_finishes_the_step_saves_and_says_where(corpus, tmp_path, nproc):
    """Issue: Ctrl-C ended in a KeyboardInterrupt traceback from every rank and saved nothing.
    Now: the step finishes, the checkpoint is saved (its resume is the SIGTERM test's), one line
    says where, exit 130."""
    ckpt, data = tmp_path / "ckpt", data_args(corpus, tmp_path / "cache")
    process = popen(nproc, SMALL_MODEL + data + COMMON + ["--save", str(ckpt), "--save-interval", "2"])
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    _signal_after(process, ckpt / "metrics.jsonl", 3, signal.SIGINT, ready=tracker.exists)
    stdout, stderr = _finish(process)

    saved = int(tracker.read_text())
    assert 3 <= saved < ITERS, stdout[-3000:] + stderr[-5000:]
    assert (
        f"exiting at iteration {saved}: Ctrl-C (SIGINT); checkpoint {ckpt / f'iter_{saved:07d}'}, "
        f"resume with --load {ckpt}"
    ) in stdout.splitlines()
    assert _rank_lines(stderr) == [
        "Ctrl-C: stopping after this step, saving a checkpoint; press Ctrl-C again to abort at once"
    ]
    assert not list(ckpt.glob("*.incomplete"))
    assert process.returncode == (130 if nproc == 1 else 1)  # torchrun ends 1 on the signal it got


def test_ctrl_c_without_save_is_one_line(corpus, uninterrupted, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    process = popen(1, SMALL_MODEL + data_args(corpus, tmp_path / "cache") + COMMON + ["--metrics-file", str(metrics)])
    _signal_after(process, metrics, 2, signal.SIGINT)
    stdout, stderr = _finish(process)
    records = read_metrics(metrics)[0]
    stopped = max(records)
    assert process.returncode == 130
    exit_line = f"exiting at iteration {stopped}: Ctrl-C (SIGINT); nothing saved (no --save)"
    assert exit_line in stdout.splitlines()
    assert stderr.strip().splitlines() == [
        "Ctrl-C: stopping after this step, not saving (no --save); press Ctrl-C again to abort at once"
    ]
    _assert_same_trajectory(records, uninterrupted(1), range(1, stopped + 1))  # the step it finished is whole


_MONITOR = """
import importlib.util, sys, types
import torch

# The module alone: the training package's imports (megatron-core) take seconds.
spec = importlib.util.spec_from_file_location("signals", "megatron_reweight/training/signals.py")
signals = importlib.util.module_from_spec(spec)
spec.loader.exec_module(signals)

checkpoint = types.SimpleNamespace(exit_signal="SIGTERM", exit_signal_handler=True, exit_duration_in_mins=None,
                                   exit_interval=None, save="ckpt")
with signals.ExitMonitor(checkpoint, torch.device("cpu")) as monitor:
    print("ready", flush=True)
    sys.stdin.readline()  # the signals arrive while it waits here
    print(monitor.should_exit(1), monitor.reason, flush=True)
"""


@pytest.mark.parametrize(
    "signals, aborted",
    [
        ([signal.SIGINT, signal.SIGINT], True),  # a second Ctrl-C
        ([signal.SIGINT, signal.SIGTERM], True),  # torchrun's SIGTERM to its ranks at a second Ctrl-C
        ([signal.SIGTERM, signal.SIGTERM], False),  # Slurm signals both the rank and torchrun, which passes it on
    ],
    ids=["ctrl_c-twice", "ctrl_c-then-torchrun-sigterm", "sigterm-twice"],
)
def test_second_ctrl_c_aborts_at_once(signals, aborted):
    process = subprocess.Popen(
        [sys.executable, "-c", _MONITOR], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    try:
        assert process.stdout.readline() == "ready\n"
        for number in signals:
            process.send_signal(number)
            time.sleep(0.3)  # each handler runs before the next signal
        stdout, stderr = process.communicate("go\n", timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    if aborted:
        assert process.returncode == 130 and stdout == ""
        assert stderr.splitlines() == [
            "Ctrl-C: stopping after this step, saving a checkpoint; press Ctrl-C again to abort at once",
            "second Ctrl-C: aborted at once, nothing saved since the last checkpoint",
        ]
    else:
        assert process.returncode == 0 and stdout == "True received SIGTERM\n" and stderr == ""


def test_ctrl_c_while_starting_is_one_line(tmp_path):
    """Before the training loop's handler is in place (imports, data preparation, set-up)."""
    process = subprocess.Popen(
        [sys.executable, str(REPO / "pretrain_llama.py"), "--mock-data", "--train-iters", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    maps, deadline = Path(f"/proc/{process.pid}/maps"), time.time() + 60
    while "libtorch" not in maps.read_text():  # importing torch: Python's own SIGINT handler is in place
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert stderr.strip().splitlines() == [
        "pretrain_llama.py: interrupted (Ctrl-C) before training began; nothing saved"
    ]
