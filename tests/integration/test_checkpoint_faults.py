"""Checkpoints under faults. One trainer run saves every 2 steps and is SIGKILLed after its
second checkpoint; the tests then look at what it left behind."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import REPO
from megatron_reweight import export
from tests.helpers.pretrain import (
    SMALL_MODEL,
    _env,
    command,
    data_args,
    make_corpus,
    read_metrics,
    run,
    write_tokenizer,
)


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
    assert "note: reweighting differs" not in resumed.stdout  # the same settings: nothing to note
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


def test_resume_refuses_a_checkpoint_of_another_vocab_mismatch(killed_run, checkpoints, tmp_path):
    """megatron-core loads an embedding of another size silently (cut down, or into the first
    rows of a fresh one). Without the refusal this run trains on and exits 0 at iteration 5."""
    corpus = {**killed_run["corpus"], "tokenizer": str(write_tokenizer(tmp_path / "tokenizer.json", 1024))}
    args = SMALL_MODEL + data_args(corpus, killed_run["root"] / "cache") + [
        "--train-iters", "1000", "--eval-iters", "0", "--load", str(checkpoints), "--exit-interval", "5",
    ]  # fmt: skip
    line = error_line(run(1, args, check=False))
    assert line == (
        f"pretrain_llama.py: error: --load {checkpoints}: the checkpoint's model has a vocabulary of 256 ids, this "
        "run 1024 (both padded: the tokenizer's ids rounded up to a multiple of --make-vocab-size-divisible-by x TP); "
        "resume with the checkpoint's --tokenizer-model and --make-vocab-size-divisible-by"
    )


def test_missing_or_corrupt_checksums_json_is_damaged_checksum(killed_run, checkpoints):
    """checksums.json deleted from a checkpoint whose run recorded checksums (common.pt says so) no
    longer turns verification off; a corrupt one, also of an older checkpoint that the message
    lists, is a damaged checkpoint, not a JSONDecodeError traceback."""
    (checkpoints / "iter_0000004" / "checksums.json").unlink()
    (checkpoints / "iter_0000002" / "checksums.json").write_text('{"algorithm": "xxh3_128", "files": {"com')
    line = error_line(resume(killed_run, checkpoints, "--exit-interval", "5", check=False))
    assert line == (
        f"pretrain_llama.py: error: --load {checkpoints}: the checkpoint of iteration 4 is damaged: checksums.json "
        "is missing, although the run saved checksums; no complete checkpoint before it is left: start afresh "
        "with another --load"
    )
    line = error_line(resume(killed_run, checkpoints, "--ckpt-step", "2", "--exit-interval", "3", check=False))
    assert line.startswith(
        f"pretrain_llama.py: error: --load {checkpoints}: the checkpoint of iteration 2 is damaged: checksums.json "
        "cannot be read (JSONDecodeError: "
    )


def test_resume_notes_changed_reweighting_settings(killed_run, checkpoints):
    """Another strategy, window or r is legitimate on resume, and said in one line."""
    resumed = resume(
        killed_run, checkpoints, "--reweight-strategy", "capped", "--reweight-r", "0.5", "--reweight-window",
        "global-batch", "--exit-interval", "5",
    )  # fmt: skip
    notes = [line for line in resumed.stdout.splitlines() if "note: reweighting differs" in line]
    assert notes == [
        "note: reweighting differs from the checkpoint's run (--reweight-strategy linupper -> capped; --reweight-r "
        "0.4 -> 0.5; --reweight-window micro-batch -> global-batch): this run's applies"
    ]


def export_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_status:
        export.main(list(args))
    assert exit_status.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


def test_export_checksum_mismatch_and_incomplete_save_are_refused(killed_run, checkpoints, tmp_path, capsys):
    """The exporter verifies a checkpoint as the trainer does (one flipped bit here exported with
    exit 0 and a wrong model.norm.weight) and refuses an incomplete save."""
    hf = tmp_path / "hf"
    incomplete = checkpoints / "iter_0000006.incomplete"
    shutil.rmtree(incomplete, ignore_errors=True)
    shutil.copytree(checkpoints / "iter_0000002", incomplete)  # a save that wrote its files, not renamed
    assert export_error(capsys, "--load-dir", str(incomplete), "--save-dir", str(hf)) == (
        f"megatron-reweight-export: error: --load-dir {incomplete}: an incomplete save (the run stopped while "
        "writing it); complete checkpoints: iteration 4, 2; load one with --ckpt-step 4"
    )
    shard = sorted((checkpoints / "iter_0000004").glob("*.distcp"))[0]
    with open(shard, "r+b") as file:
        file.seek(shard.stat().st_size // 2)
        byte = file.read(1)[0]
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([byte ^ 0x10]))
    assert export_error(capsys, "--load-dir", str(checkpoints), "--save-dir", str(hf)) == (
        f"megatron-reweight-export: error: --load-dir {checkpoints}: the checkpoint of iteration 4 is damaged: "
        f"{shard.name} differs from the saved file (checksum mismatch); complete checkpoints: iteration 2; load one "
        "with --ckpt-step 2"
    )
    line = export_error(capsys, "--load-dir", str(checkpoints), "--ckpt-step", "6", "--save-dir", str(hf))
    assert "no complete checkpoint of iteration 6" in line and "only an incomplete save" in line
    assert not hf.exists()


def test_export_save_dir_that_is_a_file_or_truncated_checkpoint_is_one_line(killed_run, checkpoints, capsys):
    a_file = checkpoints / "metrics.jsonl"
    assert export_error(capsys, "--load-dir", str(checkpoints), "--save-dir", str(a_file)) == (
        f"megatron-reweight-export: error: --save-dir {a_file} is a file, not a directory; choose a writable directory"
    )
    damaged = checkpoints / "iter_0000004"
    shard = sorted(damaged.glob("*.distcp"))[-1]
    size = shard.stat().st_size
    os.truncate(shard, size // 2)
    line = export_error(capsys, "--load-dir", str(checkpoints), "--save-dir", str(checkpoints.parent / "hf"))
    assert f"the checkpoint of iteration 4 is damaged: {shard.name} has {size // 2} bytes, {size} when saved" in line
    # checksums.json deleted, where common.pt says the run recorded checksums: damaged.
    (damaged / "checksums.json").unlink()
    line = export_error(capsys, "--load-dir", str(checkpoints), "--save-dir", str(checkpoints.parent / "hf"))
    assert "iteration 4 is damaged: checksums.json is missing, although the run saved checksums" in line
    # Without checksums (--no-ckpt-checksums, or an older version: common.pt cannot tell here) the
    # reader's own error, in a process of its own (the export's reader starts torch.distributed).
    os.truncate(damaged / "common.pt", 100)
    result = subprocess.run(
        [sys.executable, "-m", "megatron_reweight.export", "--load-dir", str(checkpoints), "--save-dir",
         str(checkpoints.parent / "hf")],
        capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-5000:]
    expected = f"megatron-reweight-export: error: --load-dir {checkpoints}: {damaged} cannot be read ("
    assert result.stderr.startswith(expected)


def in_private_tmpfs(options: str, mount_point: Path, cmd: list[str], listing: Path | None = None):
    """Run `cmd` with a fresh tmpfs (mount `options`: a small size, or ro) at `mount_point`, in a
    private mount namespace that vanishes with it: a full or read-only disk without root on the
    host. `listing` gets `ls -A` of mount_point/ckpt after `cmd` ended."""
    if subprocess.run(["unshare", "-Urm", "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("needs unshare -Urm (user and mount namespaces) to mount a small tmpfs")
    mount_point.mkdir(parents=True, exist_ok=True)
    script = 'mount -t tmpfs -o "$1" tmpfs "$2" || exit 97; ckpt="$2/ckpt"; out="$3"; shift 3; "$@"; rc=$?; '
    script += '[ -z "$out" ] || ls -A "$ckpt" > "$out"; exit $rc'
    result = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", script, "sh", options, str(mount_point), str(listing or ""), *cmd],
        capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode != 97, result.stderr
    return result


def test_full_disk_during_save_says_no_space_left_and_removes_the_incomplete_save(killed_run, tmp_path):
    """A 2 MiB disk holds the checkpoint of iteration 2 (1.4 MB) but not also that of iteration 4."""
    disk, listing = tmp_path / "disk", tmp_path / "listing"
    args = SMALL_MODEL + data_args(killed_run["corpus"], killed_run["root"] / "cache") + [
        "--train-iters", "4", "--eval-iters", "0", "--save", str(disk / "ckpt"), "--save-interval", "2",
    ]  # fmt: skip
    result = in_private_tmpfs("size=2m", disk, command(1, args), listing)
    assert result.returncode == 1 and f"saved checkpoint {disk / 'ckpt' / 'iter_0000002'}" in result.stdout, (
        result.stdout[-3000:] + result.stderr[-5000:]
    )
    line = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr, result.stderr[-5000:]
    assert line.startswith(f"pretrain_llama.py: error: --save {disk / 'ckpt'}: no space left on the device of ")
    assert line.endswith(
        "while saving the checkpoint of iteration 4; removed the incomplete "
        f"{disk / 'ckpt' / 'iter_0000004.incomplete'}; the latest complete checkpoint is iteration 2 "
        f"({disk / 'ckpt' / 'iter_0000002'}), so the steps after it are not saved; free space, then resume with "
        f"--load {disk / 'ckpt'}"
    )
    assert sorted(listing.read_text().split()) == ["iter_0000002", "latest_checkpointed_iteration.txt", "metrics.jsonl"]


def test_read_only_save_and_export_save_dir_are_one_line(killed_run, checkpoints, tmp_path):
    disk = tmp_path / "disk"
    args = SMALL_MODEL + data_args(killed_run["corpus"], killed_run["root"] / "cache") + [
        "--train-iters", "4", "--eval-iters", "0", "--save", str(disk / "ckpt"),
    ]  # fmt: skip
    line = error_line(in_private_tmpfs("ro,size=1m", disk, command(1, args)))
    assert line == (
        f"pretrain_llama.py: error: --save {disk / 'ckpt'} cannot be written (Read-only file system); "
        "choose a writable directory"
    )
    exporting = [sys.executable, "-m", "megatron_reweight.export", "--load-dir", str(checkpoints), "--save-dir",
                 str(disk / "hf")]  # fmt: skip
    result = in_private_tmpfs("ro,size=1m", disk, exporting)
    assert result.returncode == 2 and result.stderr == (
        f"megatron-reweight-export: error: --save-dir {disk / 'hf'} cannot be written (Read-only file system); "
        "choose a writable directory\n"
    ), result.stderr[-5000:]
