"""The Slurm launch scripts in examples/slurm/, run for real.

A throw-away Slurm cluster with two emulated nodes (tests/slurm_cluster.py) runs
the unmodified sbatch scripts with the CPU override the scripts provide for CI
(LAUNCHER=venv, DEVICE=cpu, NPROC_PER_NODE=1, MODEL_ARGS_OVERRIDE="--preset
tiny", small batches and step counts), on the real trainer pretrain_llama.py:

* prepare_fineweb.sbatch, as a 2-task array, tokenises a FineWeb-shaped parquet
  corpus with megatron_reweight.data.prepare;
* llama7b_fineweb175b.sbatch trains on it on 2 nodes and writes a checkpoint;
* llama1p4b_fineweb100b.sbatch gets the time-limit signal (what
  `#SBATCH --signal=B:USR1@...` sends), saves, requeues itself, resumes and
  ends with the steps of an uninterrupted run;
* gpt2_slimpajama.sbatch trains on seven domains named as SlimPajama's.

Without Slurm: each training script's full-size command line (DRY_RUN=1) is
accepted by the trainer's argument parser, and unset paths fail loudly.

The cluster needs root and Debian's slurm-wlm and munge packages; its tests are
skipped, with the reason, without them.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.helpers.slurm_cluster import SlurmCluster, missing_binaries

SLURM_DIR = REPO / "examples" / "slurm"
SLIMPAJAMA_DOMAINS = [
    "RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaGithub", "RedPajamaArXiv",
    "RedPajamaBook", "RedPajamaWikipedia", "RedPajamaStackExchange",
]  # fmt: skip

_missing = missing_binaries()
if _missing:
    _no_cluster = f"Slurm/munge not installed ({', '.join(_missing)} missing): apt-get install slurm-wlm munge"
elif os.geteuid() != 0:
    _no_cluster = "the test Slurm cluster runs slurmd, which starts jobs, as root"
else:
    _no_cluster = ""
needs_cluster = pytest.mark.skipif(bool(_no_cluster), reason=_no_cluster)


# ----------------------------------------------------------------------------- helpers
def _venv(work: Path) -> str:
    """VENV for LAUNCHER=venv: the virtual environment running the tests, or else
    one made on top of the interpreter running them (its packages visible)."""
    if (Path(sys.prefix) / "bin" / "activate").is_file():
        return sys.prefix
    venv = work / "venv"
    if not (venv / "bin" / "activate").is_file():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    return str(venv)


def _torchrun() -> str:
    beside_python = Path(sys.executable).with_name("torchrun")
    return str(beside_python) if beside_python.exists() else (shutil.which("torchrun") or "torchrun")


def base_env(work: Path, **overrides) -> dict[str, str]:
    """The CPU override every test job gets: the scripts' own knobs, nothing else."""
    env = {
        "REPO_DIR": str(REPO),
        "RUN_ROOT": str(work / "runs"),
        "DATA_ROOT": str(work / "data"),
        "LAUNCHER": "venv",
        "VENV": _venv(work),
        "TORCHRUN": _torchrun(),
        "DEVICE": "cpu",
        "NPROC_PER_NODE": "1",
        "OMP_NUM_THREADS": "1",
        "MODEL_ARGS_OVERRIDE": "--preset tiny",
        "SEQ_LEN": "64",
        "GLOBAL_BATCH": "4",
        "MICRO_BATCH": "2",
        "LR_WARMUP_ITERS": "1",
        "R_WARMUP_STEPS": "2",
        "SAVE_INTERVAL": "2",
        "EVAL_INTERVAL": "1000",
        "LOG_INTERVAL": "1",
        "EXTRA_ARGS": "--eval-iters 0",
    }
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def submit(cluster: SlurmCluster, work: Path, script: str, env: dict, *sbatch_args: str) -> int:
    # Options on the command line override the scripts' #SBATCH lines: the test
    # cluster's partition, no GPUs, a short time limit, output in the temp dir.
    return cluster.sbatch(
        ["--partition=debug", "--account=ci", "--gpus-per-node=0", "--time=15",
         f"--output={work}/%x-%j.out", *sbatch_args, str(SLURM_DIR / script)],
        env=env, cwd=work,
    )  # fmt: skip


def job_output(work: Path, job_id: int | str) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(work.glob(f"*-{job_id}.out")))


def checkpoint_iteration(run_dir: Path) -> int | None:
    path = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    return int(path.read_text().strip()) if path.is_file() else None


def metrics(run_dir: Path, kind: str) -> list[dict]:
    path = run_dir / "checkpoints" / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("kind") == kind]


def _documents(limit_chars: int) -> list[str]:
    """Real text that is there offline: the Python standard library's modules."""
    docs, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(errors="replace")
        if len(text) >= 2000:
            docs.append(text)
            total += len(text)
        if total > limit_chars:
            break
    return docs


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def cluster():
    # A random first job id: the scripts derive the rendezvous port from it, and
    # two test sessions on one machine must not meet.
    c = SlurmCluster(nodes=2, cpus_per_node=1, first_job_id=random.randrange(100, 19000))
    c.start()
    try:
        yield c
    finally:
        c.stop()
        c.cleanup()


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm")


@pytest.fixture(scope="session")
def corpus(work) -> dict[str, Path]:
    """A FineWeb-shaped parquet corpus (4 files), a SlimPajama-shaped jsonl file
    with seven domains, and a byte-level BPE tokenizer.json trained on them."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    tokenizers = pytest.importorskip("tokenizers")
    docs = _documents(2_500_000)
    root = work / "corpus"
    parquet_dir = root / "fineweb" / "sample" / "350BT"
    parquet_dir.mkdir(parents=True)
    for f in range(4):
        part = docs[f::4]
        ids = [f"<urn:uuid:{f}-{i}>" for i in range(len(part))]
        pq.write_table(pa.table({"text": part, "id": ids}), parquet_dir / f"{f:03d}_00000.parquet")
    with open(root / "slimpajama.jsonl", "w") as out:
        for i, text in enumerate(docs):
            domain = SLIMPAJAMA_DOMAINS[i % len(SLIMPAJAMA_DOMAINS)]
            out.write(json.dumps({"text": text, "meta": {"redpajama_set_name": domain}}) + "\n")
    (root / "tokenizer").mkdir()
    tokenizer = tokenizers.ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(docs, vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer.save(str(root / "tokenizer" / "tokenizer.json"))
    return {"fineweb": root / "fineweb", "slimpajama": root / "slimpajama.jsonl",
            "tokenizer": root / "tokenizer" / "tokenizer.json"}  # fmt: skip


@pytest.fixture(scope="session")
def fineweb(cluster, work, corpus) -> Path:
    """prepare_fineweb.sbatch as a 2-task array: DATA_ROOT/fineweb/part-00{0,1}."""
    env = base_env(work, FINEWEB_DIR=corpus["fineweb"], TOKENIZER=corpus["tokenizer"], TOKEN_BUDGET="3e5")
    job = submit(cluster, work, "prepare_fineweb.sbatch", env, "--array=0-1", "--cpus-per-task=1", "--mem=1000",
                 f"--output={work}/%x-%A_%a.out")  # fmt: skip
    tasks = cluster.wait_job(job, timeout=300)
    out = job_output(work, f"{job}_0") + job_output(work, f"{job}_1")
    assert len(tasks) == 2 and all(t["JobState"] == "COMPLETED" for t in tasks), f"{tasks}\n{out}"
    data = work / "data" / "fineweb"
    for part in ("part-000", "part-001"):
        summary = json.loads((data / part / "summary.json").read_text())
        assert summary["tokens"] >= 150_000 and summary["budget_reached"], summary
        assert (data / part / "data_path.txt").is_file()
    assert (data / "tokenizer.json").read_bytes() == corpus["tokenizer"].read_bytes()
    return data


# ------------------------------------------------------------------ tests without Slurm
@pytest.mark.parametrize(
    "script", ["llama7b_fineweb175b.sbatch", "llama1p4b_fineweb100b.sbatch", "gpt2_slimpajama.sbatch"]
)
def test_full_size_command_line_is_accepted_by_the_trainer(script, tmp_path):
    """DRY_RUN=1 prints the real run's command; the trainer's parser takes every flag."""
    arguments = pytest.importorskip("megatron_reweight.training.arguments")
    data = tmp_path / "data" / "fineweb" / "part-000"
    data.mkdir(parents=True)
    (data / "data_path.txt").write_text(f"1 {data}/fineweb_00000\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(DRY_RUN="1", RUN_ROOT=str(tmp_path / "runs"), DATA_ROOT=str(tmp_path / "data"), IMAGE="nvcr.io#x/y:1")
    p = subprocess.run(
        ["bash", str(SLURM_DIR / script)], env=env, cwd=REPO, check=False, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr + p.stdout
    argv = shlex.split(next(line for line in p.stdout.splitlines() if line.startswith("srun ")))
    assert "--container-image=nvcr.io#x/y:1" in argv
    trainer_args = argv[argv.index("/opt/megatron-reweight/pretrain_llama.py") + 1 :]
    config = arguments.settings_from_args(arguments.build_parser().parse_args(trainer_args))
    ck, o, r, par = config.checkpoint, config.optim, config.reweight, config.parallel
    assert ck.save == ck.load and ck.exit_signal_handler and ck.exit_signal == "SIGTERM"
    assert r.window == "global-batch"  # the paper's minibatch is weighted at once
    if script.startswith("llama7b"):
        assert "plan: 128 sequences x 8192 tokens x 170000 steps = 178.3e9 tokens" in p.stdout
        assert "plan: 64 GPUs at 6533 tokens/s/GPU: 118.4 hours" in p.stdout  # the plan's step cost 1.148
        assert "--nnodes=8" in argv and "--nproc-per-node=8" in argv
        assert (config.preset, par.tensor_model_parallel_size, par.sequence_parallel) == ("llama-7b", 2, True)
        assert (r.strategy, r.temperature.r, r.temperature.warmup_steps) == ("linupper", 2.0, 2000)
        assert (o.lr, o.min_lr, o.lr_warmup_iters, o.train_iters) == (3e-4, 3e-5, 2000, 170000)
    elif script.startswith("llama1p4b"):
        assert "plan: 128 sequences x 8192 tokens x 100000 steps = 104.9e9 tokens" in p.stdout
        assert (config.preset, r.temperature.r, o.train_iters, config.model.seq_length) == (
            "llama-1.4b",
            1.0,
            100000,
            8192,
        )
    else:
        assert (config.preset, r.temperature.r, o.train_iters, o.global_batch_size) == ("gpt2-mini", 0.4, 20000, 32)
        data_path = config.data.data_path
        weights = [float(w) for w in data_path[0::2]]
        assert [Path(p).name for p in data_path[1::2]] == SLIMPAJAMA_DOMAINS
        assert abs(sum(weights) - 1) < 1e-9


def test_unset_paths_fail_loudly():
    env = {k: v for k, v in os.environ.items() if k not in ("RUN_ROOT", "DATA_ROOT") and not k.startswith("SLURM_")}
    p = subprocess.run(["bash", str(SLURM_DIR / "llama7b_fineweb175b.sbatch")], env=dict(env, DRY_RUN="1"),
                       cwd=REPO, check=False, capture_output=True, text=True)  # fmt: skip
    assert p.returncode != 0 and "set RUN_ROOT" in p.stderr


# --------------------------------------------------------------------- tests on Slurm
@needs_cluster
def test_two_node_job_trains_and_checkpoints(cluster, work, fineweb):
    env = base_env(work, TRAIN_ITERS=4, RUN_NAME="two-node")
    job = submit(cluster, work, "llama7b_fineweb175b.sbatch", env, "--nodes=2")
    info = cluster.wait_job(job, timeout=300)[0]
    out = job_output(work, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{out}"
    run_dir = work / "runs" / "two-node"
    assert checkpoint_iteration(run_dir) == 4, out
    assert "2 node(s)" in out and "rendezvous at 127.0.0.1:" in out, out
    (run,) = metrics(run_dir, "run")
    assert (run["world_size"], run["dp"], run["preset"]) == (2, 2, "tiny"), run
    assert [r["iteration"] for r in metrics(run_dir, "train")] == [1, 2, 3, 4]


@needs_cluster
def test_time_limit_signal_saves_requeues_and_resumes(cluster, work, fineweb):
    """`scancel --batch --signal=USR1` is exactly what `#SBATCH --signal=B:USR1@T`
    sends at T seconds before the time limit."""
    iters = 16
    env = base_env(work, TRAIN_ITERS=iters, SAVE_INTERVAL=4, GLOBAL_BATCH=8, RUN_NAME="preempted")
    job = submit(cluster, work, "llama1p4b_fineweb100b.sbatch", env, "--nodes=2")
    run_dir = work / "runs" / "preempted"

    # Signal once training is under way: after its first periodic checkpoint.
    deadline = time.monotonic() + 240
    while (checkpoint_iteration(run_dir) or 0) < 4:
        info = cluster.job(job)
        assert info["JobState"] in ("PENDING", "RUNNING"), f"{info}\n{job_output(work, job)}"
        assert time.monotonic() < deadline, job_output(work, job)
        time.sleep(0.2)
    cluster.run(["scancel", "--batch", "--signal=USR1", str(job)])

    # The job saves and requeues itself. Slurm holds a requeued job back for a
    # while (BeginTime); the test shortens that wait to 2 s. Not to 0: slurmd
    # rejects a launch in the same second as the revocation of the previous
    # attempt's credential ("Job credential revoked"), and the job fails.
    deadline = time.monotonic() + 120
    while (info := cluster.job(job))["Restarts"] != "1" or info["JobState"] not in ("PENDING", "RUNNING"):
        assert info["JobState"] not in cluster.TERMINAL, f"{info}\n{job_output(work, job)}"
        assert time.monotonic() < deadline, f"{info}\n{job_output(work, job)}"
        time.sleep(0.2)
    stopped_at = checkpoint_iteration(run_dir)
    assert 4 <= stopped_at < iters, job_output(work, job)
    if info["JobState"] == "PENDING":
        time.sleep(2)
        cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False)
    info = cluster.wait_job(job, timeout=300)[0]
    out = job_output(work, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{out}"

    assert f"requeueing job {job} to continue from iteration {stopped_at}" in out, out
    assert f"resuming from iteration {stopped_at} of {iters}" in out, out
    assert checkpoint_iteration(run_dir) == iters
    # Every step ran exactly once over the two attempts, as in an uninterrupted run.
    assert [r["iteration"] for r in metrics(run_dir, "train")] == list(range(1, iters + 1))
    assert len(metrics(run_dir, "run")) == 2


@needs_cluster
def test_gpt2_on_seven_slimpajama_domains(cluster, work, corpus):
    prepare = [
        sys.executable, "-m", "megatron_reweight.data.prepare", "--input", str(corpus["slimpajama"]),
        "--domain-field", "meta.redpajama_set_name", "--merge-shards", "--tokenizer", str(corpus["tokenizer"]),
        "--output-dir", str(work / "data" / "slimpajama"), "--workers", "1", "--no-progress",
    ]  # fmt: skip
    p = subprocess.run(prepare, cwd=REPO, check=False, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    (work / "data" / "slimpajama" / "tokenizer.json").write_bytes(corpus["tokenizer"].read_bytes())

    env = base_env(work, TRAIN_ITERS=2, RUN_NAME="gpt2", GLOBAL_BATCH=2, MICRO_BATCH=2)
    job = submit(cluster, work, "gpt2_slimpajama.sbatch", env)
    info = cluster.wait_job(job, timeout=300)[0]
    out = job_output(work, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{out}"
    assert checkpoint_iteration(work / "runs" / "gpt2") == 2, out
    (run,) = metrics(work / "runs" / "gpt2", "run")
    assert run["domains"] == SLIMPAJAMA_DOMAINS, run


@needs_cluster
def test_a_crash_is_not_requeued(cluster, work, fineweb):
    env = base_env(work, TRAIN_ITERS=2, RUN_NAME="crash", EXTRA_ARGS="--eval-iters 0 --no-such-flag")
    job = submit(cluster, work, "llama1p4b_fineweb100b.sbatch", env, "--nodes=1")
    info = cluster.wait_job(job, timeout=120)[0]
    out = job_output(work, job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", f"{info}\n{out}"
    assert "not requeueing" in out and "--no-such-flag" in out, out
