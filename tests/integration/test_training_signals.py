"""Stop signals as a cluster sends them: SIGTERM to every process of the run (Slurm's
preemption, scancel), on one process and under torchrun. The save it triggers completes and
resumes exactly."""

import os
import signal
import subprocess
import time

import pytest

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
    assert f"exiting at iteration {saved}: received SIGTERM" in stdout
    assert not list(ckpt.glob("*.incomplete")), stderr[-5000:]
    if nproc == 1:  # torchrun itself ends non-zero with a traceback of the signal it got
        assert process.returncode == 0, stderr[-5000:]

    metrics = tmp_path / "resumed.jsonl"
    resumed = run(nproc, SMALL_MODEL + data + COMMON + ["--load", str(ckpt), "--metrics-file", str(metrics)])
    assert f"resumed from {ckpt / f'iter_{saved:07d}'}" in resumed.stdout
    _assert_same_trajectory(read_metrics(metrics)[0], uninterrupted(nproc), range(saved + 1, ITERS + 1))
