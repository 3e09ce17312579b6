"""Checkpoints of pretrain_llama.py on CPU (gloo, torch_dist format): exact resume,
SIGTERM -> save and exit 0, crash-safe layout, fresh start from an empty --load."""

import os
import signal
import time
from pathlib import Path

import pytest

from tests.helpers.pretrain import SMALL_MODEL, data_args, make_corpus, popen, read_metrics, run

ITERS = 12
COMMON = ["--train-iters", str(ITERS), "--log-interval", "1", "--eval-interval", "6", "--eval-iters", "1",
          "--use-distributed-optimizer"]  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def test_resumed_run_continues_the_same_trajectory(corpus, tmp_path):
    data = data_args(corpus, tmp_path / "cache")
    # Uninterrupted: 12 steps.
    run(2, SMALL_MODEL + data + COMMON + ["--save", str(tmp_path / "a"), "--save-interval", "6"])
    # Interrupted: 6 steps, save, exit (--exit-interval); then a new job resumes to 12.
    b = tmp_path / "b"
    first = run(2, SMALL_MODEL + data + COMMON + ["--save", str(b), "--load", str(b), "--exit-interval", "6"])
    assert "exiting at iteration 6: reached --exit-interval 6" in first.stdout
    assert (b / "latest_checkpointed_iteration.txt").read_text() == "6"
    second = run(2, SMALL_MODEL + data + COMMON + ["--save", str(b), "--load", str(b)])
    assert f"resumed from {b / 'iter_0000006'} (iteration 6, 48 samples)" in second.stdout

    a_train, a_eval = read_metrics(tmp_path / "a" / "metrics.jsonl")
    b_train, b_eval = read_metrics(b / "metrics.jsonl")
    assert sorted(b_train) == list(range(1, ITERS + 1))  # 1-6 from the first job, 7-12 from the second
    for iteration in range(1, ITERS + 1):
        for key in ("lm loss", "weighted loss", "grad norm", "lr", "r", "consumed_samples"):
            assert b_train[iteration][key] == pytest.approx(a_train[iteration][key], rel=1e-6, abs=1e-7), (
                iteration,
                key,
            )
    for domain, values in a_eval[ITERS]["domains"].items():
        assert b_eval[ITERS]["domains"][domain]["loss"] == pytest.approx(values["loss"], rel=1e-6)
    assert sorted(p.name for p in b.iterdir() if p.name.startswith("iter_")) == ["iter_0000006", "iter_0000012"]


def _rank_pids(launcher: int) -> dict[int, int]:
    """torchrun's worker processes by RANK, from /proc."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    ranks = {}
    for pid in children:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
        if rank is not None:
            ranks[rank] = int(pid)
    return ranks


def test_sigterm_saves_a_loadable_checkpoint_and_exits_zero(corpus, tmp_path):
    ckpt = tmp_path / "ckpt"  # --load of a missing directory: a fresh start
    data = data_args(corpus, tmp_path / "cache")
    args = SMALL_MODEL + data + ["--train-iters", "100000", "--log-interval", "1", "--eval-iters", "0",
                                 "--save", str(ckpt), "--load", str(ckpt)]  # fmt: skip
    process = popen(2, args)
    try:
        metrics = ckpt / "metrics.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and not (metrics.exists() and len(read_metrics(metrics)[0]) >= 3):
            assert process.poll() is None, process.communicate()
            time.sleep(0.5)
        # The signal reaches rank 1 only: the ranks agree (all-reduce) and all save.
        os.kill(_rank_pids(process.pid)[1], signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, stdout[-3000:] + stderr[-5000:]
    assert "resumed" not in stdout
    saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= saved < 1000
    assert f"exiting at iteration {saved}: received SIGTERM" in stdout
    assert max(read_metrics(ckpt / "metrics.jsonl")[0]) == saved

    # A crash during a later save leaves an .incomplete directory: it is never loaded, and
    # the next save of that iteration replaces it.
    stale = ckpt / f"iter_{saved + 2:07d}.incomplete"
    stale.mkdir()
    (stale / "common.pt").write_bytes(b"partial")
    # A shorter run than the checkpoint's keeps its LR schedule (Megatron refuses the change otherwise).
    resumed = run(2, SMALL_MODEL + data + ["--train-iters", str(saved + 2), "--log-interval", "1", "--eval-iters", "0",
                                           "--save", str(ckpt), "--load", str(ckpt),
                                           "--use-checkpoint-opt-param-scheduler"])  # fmt: skip
    assert f"resumed from {ckpt / f'iter_{saved:07d}'} (iteration {saved}, {saved * 8} samples)" in resumed.stdout
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(saved + 2)
    assert not stale.exists() and (ckpt / f"iter_{saved + 2:07d}" / "metadata.json").is_file()

    # Resuming with another model shape: one line, before any tensor is read.
    other = run(1, SMALL_MODEL + data + ["--hidden-size", "32", "--train-iters", str(saved + 4), "--load", str(ckpt)],
                check=False)  # fmt: skip
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1] == (
        f"pretrain_llama.py: error: --load {ckpt}: the checkpoint's model has hidden_size 64, this run 32 (--hidden-size)"
    )


def test_time_budget_saves_and_exits_zero(corpus, tmp_path):
    """--exit-duration-in-mins: Megatron-LM's wall-clock budget, checked after every step."""
    ckpt = tmp_path / "ckpt"
    args = SMALL_MODEL + data_args(corpus, tmp_path / "cache") + [
        "--train-iters", "1000", "--log-interval", "1", "--eval-iters", "0", "--save", str(ckpt),
        "--exit-duration-in-mins", "0.0001",
    ]  # fmt: skip
    result = run(1, args)
    assert "exiting at iteration 1: reached --exit-duration-in-mins 0.0001" in result.stdout
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "1"


def test_tracker_never_names_a_missing_checkpoint(tmp_path):
    from megatron_reweight.training import ConfigError
    from megatron_reweight.training.checkpointing import read_tracker

    assert read_tracker(tmp_path / "nothing") is None and read_tracker(tmp_path) is None
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("40")
    with pytest.raises(ConfigError, match="names iteration 40 but .*iter_0000040 is missing"):
        read_tracker(tmp_path)
    (tmp_path / "iter_0000040").mkdir()
    assert read_tracker(tmp_path) == 40


def test_resume_into_another_tensor_parallel_layout(corpus, tmp_path):
    """As Megatron-LM: the model and the plain optimizer reshard to the new TP size, the RNG
    states (one per TP/PP rank) are left out, and the distributed optimizer's default
    DP-reshardable state is refused with the fix named, unless --no-load-optim."""
    # Uniform weights: the update does not depend on the DP size, which TP=2 halves here.
    args = SMALL_MODEL + data_args(corpus, tmp_path / "cache") + [
        "--train-iters", str(ITERS), "--log-interval", "1", "--eval-iters", "0", "--reweight-strategy", "uniform",
    ]  # fmt: skip
    run(2, args + ["--save", str(tmp_path / "reference")])
    reference, _ = read_metrics(tmp_path / "reference" / "metrics.jsonl")

    plain = tmp_path / "plain"
    run(2, args + ["--save", str(plain), "--exit-interval", "6"])
    resumed = run(2, args + ["--save", str(plain), "--load", str(plain), "--tensor-model-parallel-size", "2"])
    assert "RNG states not loaded (TP 1 PP 1 -> TP 2 PP 1)" in resumed.stdout and "TP 2" in resumed.stdout
    train, _ = read_metrics(plain / "metrics.jsonl")
    for iteration in range(7, ITERS + 1):  # Adam's moments moved with the shards
        for key in ("lm loss", "grad norm"):
            assert train[iteration][key] == pytest.approx(reference[iteration][key], rel=1e-4), (iteration, key)

    distributed = tmp_path / "distributed"
    run(2, args + ["--save", str(distributed), "--exit-interval", "6", "--use-distributed-optimizer"])
    new_layout = args + ["--load", str(distributed), "--use-distributed-optimizer", "--tensor-model-parallel-size", "2"]
    refused = run(2, new_layout, check=False)
    assert refused.returncode != 0  # torchrun reports a failed rank as 1
    assert [line for line in refused.stderr.splitlines() if "error:" in line] == [
        f"pretrain_llama.py: error: --load {distributed}: the distributed optimizer's dp_reshardable state cannot "
        "move to another layout (TP 1 PP 1 -> TP 2 PP 1); resume with the saved TP/PP, or add --no-load-optim to "
        "start the optimizer state afresh (saving with --dist-ckpt-optim-fully-reshardable keeps it across layouts)"
    ]
    fresh_optimizer = run(
        2, new_layout + ["--no-load-optim", "--no-load-rng", "--train-iters", "8", "--save", str(distributed),
                         "--use-checkpoint-opt-param-scheduler"],
    )  # fmt: skip
    assert "; optimizer state not loaded (--no-load-optim); RNG states not loaded (--no-load-rng)" in (
        fresh_optimizer.stdout
    )
    train, _ = read_metrics(distributed / "metrics.jsonl")
    # Step 7's loss is the loaded weights' (before any update); the LR schedule continues.
    assert train[7]["lm loss"] == pytest.approx(reference[7]["lm loss"], rel=1e-5)
    assert train[8]["lr"] == pytest.approx(reference[8]["lr"], rel=1e-9)
