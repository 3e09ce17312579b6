"""Helpers for the trainer tests: a small multi-domain corpus of Megatron indexed datasets
with a tokenizer.json, and launching pretrain_llama.py (plain or under torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy

from megatron_reweight.launch import local_command
from tests.helpers import REPO

VOCAB = 256
EOD = 0

# A test-sized model: seconds per run on 2 CPU cores.
SMALL_MODEL = [
    "--preset", "tiny", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "64",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3", "--min-lr", "3e-4",
    "--lr-warmup-iters", "2", "--reweight-r-warmup-steps", "2", "--num-workers", "0",
]  # fmt: skip


def write_tokenizer(path: Path, vocab_size: int = VOCAB) -> Path:
    """A word-level tokenizer.json: "<|endoftext|>" is id 0, words t1..t{vocab-1}."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": EOD, **{f"t{i}": i for i in range(1, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(path))
    return path


def _documents(domain: str, count: int, rng: numpy.random.Generator):
    """Three domains of different difficulty, on disjoint token ranges: repeated short
    patterns (easy, redundant), a sparse Markov chain (learnable), uniform noise
    (unlearnable beyond its token range)."""
    transitions = numpy.random.default_rng(7).integers(32, 96, size=(VOCAB, 2))
    for _ in range(count):
        length = int(rng.integers(80, 240))
        if domain == "repeat":
            pattern = rng.integers(1, 32, size=int(rng.integers(3, 8)))
            doc = numpy.resize(pattern, length)
        elif domain == "markov":
            doc = numpy.empty(length, dtype=numpy.int64)
            doc[0] = rng.integers(32, 96)
            for i in range(1, length):
                doc[i] = transitions[doc[i - 1], rng.integers(0, 2)]
        else:
            doc = rng.integers(96, VOCAB, size=length)
        yield numpy.append(doc, EOD).astype(numpy.uint16)


def make_corpus(root: Path, domains=("repeat", "markov", "noise"), docs_per_domain: int = 120) -> dict:
    """Write one Megatron indexed dataset per domain (prefix basename = domain name)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    root.mkdir(parents=True, exist_ok=True)
    rng = numpy.random.default_rng(0)
    prefixes = []
    for domain in domains:
        prefix = root / domain
        builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=numpy.uint16)
        for doc in _documents(domain, docs_per_domain, rng):
            builder.add_document(doc, [len(doc)])
        builder.finalize(str(prefix) + ".idx")
        prefixes.append(str(prefix))
    tokenizer = write_tokenizer(root / "tokenizer.json")
    return {"prefixes": prefixes, "tokenizer": str(tokenizer), "domains": list(domains)}


def data_args(corpus: dict, cache: Path | None, weights=None) -> list[str]:
    """The corpus as a blend (equal weights by default), indices cached in `cache` (None: no --data-cache-path)."""
    weights = weights or [1.0] * len(corpus["prefixes"])
    blend = [x for w, p in zip(weights, corpus["prefixes"]) for x in (str(w), p)]
    cache_args = [] if cache is None else ["--data-cache-path", str(cache)]
    return ["--data-path", *blend, "--tokenizer-model", corpus["tokenizer"], "--split", "90,10,0", *cache_args]


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def command(nproc: int, args: list[str], script: Path = REPO / "pretrain_llama.py") -> list[str]:
    return local_command(nproc, [str(script), *args])


def run(
    nproc: int, args: list[str], timeout: float = 300, check: bool = True, env: dict | None = None,
    script: Path = REPO / "pretrain_llama.py",
) -> subprocess.CompletedProcess:
    """Run pretrain_llama.py (or a `script` that wraps it) on `nproc` ranks (plain python for 1),
    with `env` added to the environment; by default fail with its output."""
    result = subprocess.run(
        command(nproc, args, script), capture_output=True, text=True, timeout=timeout, env={**_env(), **(env or {})},
        cwd=REPO, check=False,
    )  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(
            f"{script.name} {' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout[-6000:]}\n{result.stderr[-8000:]}"
        )
    return result


def popen(nproc: int, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        command(nproc, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO,
        start_new_session=True,
    )  # fmt: skip


def read_metrics(path: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(train records, eval records) by iteration; the last record of an iteration wins."""
    train, evals = {}, {}
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            train[record["iteration"]] = record
        elif record["kind"] == "eval":
            evals[record["iteration"]] = record
    return train, evals
