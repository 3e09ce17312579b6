"""Hugging Face datasets (hub or local parquet / jsonl) to Megatron indexed datasets.

    python -m megatron_reweight.data.prepare --dataset HuggingFaceFW/fineweb --dataset-config sample-350BT \\
        --tokenizer meta-llama/Llama-2-7b-hf --output-dir /data/fineweb --token-budget 175e9

Shard n is made from the input's data file n: for each domain (a `--domain-field` value, or the
single `--name`) the indexed dataset `<domain>_<n>`. Worker processes each read, tokenise and
write whole shards, so reading scales with the workers and the main process only schedules; a
shard depends on its data file alone, so the output is byte-identical for any worker count.

Resumable: a shard is built under temporary names, recorded in a manifest, then renamed into
place. A rerun after a crash redoes only the shards that are not complete, and a run whose
summary.json exists is a no-op. Token budget: the output ends with the document that
reaches the budget, in input order (data file order, then row order).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from multiprocessing.pool import IMapIterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from megatron_reweight.data.domains import SUMMARY_FILE
from megatron_reweight.data.encoding import (
    BACKENDS,
    DocumentEncoder,
    load_tokenizer,
    resolve_eod_id,
    select_backend,
    tokenizer_sha256,
)
from megatron_reweight.data.errors import DataPrepError
from megatron_reweight.data.lock import folder_lock
from megatron_reweight.data.indexed import (
    ShardWriter,
    merge,
    remove_dataset,
    shard_name,
    token_dtype,
    write_text_atomically,
)
from megatron_reweight.data.sources import Document, DocumentSource, InputConfig
from megatron_reweight.processes import die_with_parent

logger = logging.getLogger(__name__)

DATA_PATH_FILE = "data_path.txt"
WORK_DIR = ".prepare"


@dataclass
class TokenizerConfig:
    name: str  # a tokenizer.json, a folder holding one, or a Hugging Face Hub repository id
    eod_id: int | None = None  # default: the tokenizer's end-of-document token
    add_special_tokens: bool = False  # let the tokenizer's post-processor add e.g. a BOS token
    # "auto": tiktoken where it provably gives the tokenizer's ids, else HF; both give the same output,
    # so this is not part of the run's settings.
    backend: str = "auto"


@dataclass
class OutputConfig:
    output_dir: Path
    name: str = "data"  # dataset name when the input is not split by domain
    token_budget: int | None = None  # stop after the document that reaches this many tokens
    merge_shards: bool = False  # finally concatenate each domain's shards into one `<domain>` dataset
    # Domain weights of the --data-path line: "uniform", "tokens" (token-proportional) or "a=2,b=1".
    # Not part of the run's settings: a finished run can be re-weighted by running again.
    domain_weights: str = "uniform"


@dataclass
class PrepareConfig:
    input: InputConfig
    tokenizer: TokenizerConfig
    output: OutputConfig
    workers: int = 1  # processes, each tokenising one data file at a time on one core
    batch_chars: int = 1_000_000  # text per tokenizer call (whole documents; at least one)
    progress: bool = True


@dataclass
class PreparedData:
    output_dir: Path
    summary: dict[str, Any]
    data_path: list[str]  # Megatron --data-path: W1 PREFIX1 W2 PREFIX2 ...
    tokenizer_backend: str | None = None  # "tiktoken" or "hf"; None when the run was already complete


def prepare(config: PrepareConfig) -> PreparedData:
    """Write (or finish, or just re-weight) the indexed datasets of `config`."""
    _check_numbers(config)
    parse_domain_weights(config.output.domain_weights)  # bad syntax fails now, not after hours of work
    tokenizer, tokenizer_file = load_tokenizer(config.tokenizer.name)
    eod_id = resolve_eod_id(tokenizer, tokenizer_file, config.tokenizer.eod_id)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)
    source = DocumentSource(config.input)
    settings = {
        "input": source.fingerprint(),
        "tokenizer": {
            "sha256": tokenizer_sha256(tokenizer),
            "vocab_size": vocab_size,
            "eod_id": eod_id,
            "add_special_tokens": config.tokenizer.add_special_tokens,
        },
        "output": {
            "name": config.output.name,
            "token_budget": config.output.token_budget,
            "merge_shards": config.output.merge_shards,
        },
    }
    _check_writable(Path(config.output.output_dir))
    with folder_lock(Path(config.output.output_dir)):
        output = OutputDirectory(config.output.output_dir, settings, dtype)
        backend = None
        if output.summary is None:
            add_special_tokens = config.tokenizer.add_special_tokens
            fast = select_backend(tokenizer, config.tokenizer.backend, add_special_tokens)
            encoder = DocumentEncoder(tokenizer, eod_id, dtype, add_special_tokens, fast)
            backend = "hf" if fast is None else "tiktoken"
            try:
                _write_shards(config, source, encoder, output)
                output.finish(config.output.merge_shards)
            except BaseException:
                output.abandon()
                raise
        output.remove_work_files()
        data_path = data_path_of(output.summary, output.path, config.output.domain_weights)
        write_text_atomically(output.path / DATA_PATH_FILE, " ".join(data_path) + "\n")
    return PreparedData(output.path, output.summary, data_path, backend)


def _check_numbers(config: PrepareConfig) -> None:
    for name, value in [
        ("token budget", config.output.token_budget),
        ("workers", config.workers),
        ("batch chars", config.batch_chars),
    ]:
        if value is not None and value < 1:
            raise DataPrepError(f"{name} must be at least 1, got {value}")


# ----------------------------------------------------------------------------- shards
@dataclass
class ShardJob:
    """What a process needs to turn data files into shards."""

    source: DocumentSource
    encoder: DocumentEncoder
    output: OutputDirectory
    name: str  # the dataset name of documents without a domain
    batch_chars: int
    progress: Progress


def tokenize_shard(job: ShardJob, index: int, token_limit: int | None) -> dict[str, Any]:
    """Data file `index` into shard `index`, stopping after the document that reaches `token_limit`."""
    writer = job.output.new_shard(index)
    rows = 0
    for batch, rows_read in _batches(job.source.documents(index), job.batch_chars):
        tokens, lengths = job.encoder([document.text for document in batch])
        job.progress.add(len(batch), int(lengths.sum()))
        for document, stop, length in zip(batch, np.cumsum(lengths), lengths):
            writer.add(document.domain or job.name, tokens[stop - length : stop])
            if token_limit is not None and writer.tokens >= token_limit:
                return job.output.commit(writer, document.row + 1, token_limit)
        rows = rows_read
    return job.output.commit(writer, rows, token_limit)


def _batches(documents: Iterator[Document], chars: int) -> Iterator[tuple[list[Document], int]]:
    """Non-empty documents in batches of about `chars` characters (even work per tokenizer call),
    each with the number of rows read so far; the last batch may be empty."""
    batch, batch_chars, rows = [], 0, 0
    for document in documents:
        rows = document.row + 1
        if document.text:
            batch.append(document)
            batch_chars += len(document.text)
        if batch_chars >= chars:
            yield batch, rows
            batch, batch_chars = [], 0
    yield batch, rows


def _write_shards(
    config: PrepareConfig, source: DocumentSource, encoder: DocumentEncoder, output: OutputDirectory
) -> None:
    """Every shard not yet complete; with a budget, up to the shard that reaches it.

    One process goes shard by shard, each with the exact remainder of the budget as its limit.
    Worker processes run ahead of the budget check with the whole budget as their limit: when
    shard n turns out to reach the budget, the workers stop, shard n is redone (if needed) with
    the exact remainder, and the shards after it are dropped."""
    budget = config.output.token_budget
    committed = output.committed_shards()
    done_tokens = sum(_tokens_of(shard) for shard in committed.values())
    progress = Progress(config.progress, total=budget, initial=done_tokens)
    job = ShardJob(source, encoder, output, config.output.name, config.batch_chars, progress)
    output.start()
    todo = [index for index in range(source.num_files) if index not in committed]
    results = _run_in_workers(job, todo, budget, config.workers) if config.workers > 1 and len(todo) > 1 else None
    tokens = 0
    try:
        for index in range(source.num_files):
            if index in committed:
                shard = committed[index]
            elif results is not None:
                shard = next(results)
            else:
                shard = tokenize_shard(job, index, None if budget is None else budget - tokens)
            if budget is not None and tokens + _tokens_of(shard) >= budget:
                if results is not None:
                    results.close()  # stop the workers before touching their shards
                if shard["token_limit"] != budget - tokens:
                    output.discard_shards(index)
                    tokenize_shard(job, index, budget - tokens)
                output.discard_shards(index + 1)
                break
            tokens += _tokens_of(shard)
    finally:
        if results is not None:
            results.close()
        progress.close()
    progress.log_rate()


def _tokens_of(shard: dict[str, Any]) -> int:
    return sum(dataset["tokens"] for dataset in shard["datasets"].values())


def _run_in_workers(
    job: ShardJob, indices: list[int], token_limit: int | None, workers: int
) -> Iterator[dict[str, Any]]:
    """`tokenize_shard` of each index, in order, by up to `workers` processes at a time."""
    # Fork: workers inherit the loaded tokenizer and dataset instead of re-importing torch and
    # megatron-core. Single-threaded tokenizers: the parallelism comes from the processes.
    with _environment(TOKENIZERS_PARALLELISM="false"):
        pool = multiprocessing.get_context("fork").Pool(
            min(workers, len(indices)), initializer=_set_worker_job, initargs=(job,)
        )
    with pool:
        results = pool.imap(_tokenize_shard_in_worker, [(index, token_limit) for index in indices])
        for _ in indices:
            yield _next_refreshing(results, job.progress)


_worker_job: ShardJob | None = None


def _set_worker_job(job: ShardJob) -> None:
    global _worker_job
    _worker_job = job
    die_with_parent(job.progress.main_pid)  # a killed run must leave no writer behind


def _tokenize_shard_in_worker(task: tuple[int, int | None]) -> dict[str, Any]:
    return tokenize_shard(_worker_job, *task)


def _next_refreshing(results: IMapIterator, progress: Progress) -> dict[str, Any]:
    while True:
        try:
            return results.next(timeout=0.5)
        except multiprocessing.TimeoutError:
            progress.refresh()


@contextmanager
def _environment(**variables: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


class Progress:
    """Documents and tokens tokenised, counted in any process, shown (tqdm) by the main one."""

    def __init__(self, enabled: bool, total: int | None, initial: int):
        context = multiprocessing.get_context("fork")
        self.documents, self.tokens = context.Value("q", 0), context.Value("q", 0)
        self.main_pid = os.getpid()
        self.initial = initial
        self.started = time.monotonic()
        self.bar = tqdm(total=total, initial=initial, unit="tok", unit_scale=True, disable=not enabled)

    def add(self, documents: int, tokens: int) -> None:
        with self.documents.get_lock(), self.tokens.get_lock():
            self.documents.value += documents
            self.tokens.value += tokens
        if os.getpid() == self.main_pid:
            self.refresh()

    def refresh(self) -> None:
        seconds = max(time.monotonic() - self.started, 1e-9)
        self.bar.update(self.initial + self.tokens.value - self.bar.n)
        self.bar.set_postfix_str(f"{self.documents.value / seconds:,.0f} docs/s", refresh=False)

    def close(self) -> None:
        self.refresh()
        self.bar.close()

    def log_rate(self) -> None:
        seconds = max(time.monotonic() - self.started, 1e-9)
        documents, tokens = self.documents.value, self.tokens.value
        logger.info(
            f"tokenised {documents:,} documents, {tokens:,} tokens in {seconds:.1f} s "
            f"({documents / seconds:,.0f} docs/s, {tokens / seconds:,.0f} tokens/s)"
        )


class OutputDirectory:
    """The files of one run and what an interrupted run left behind:

    <dir>/<domain>_<shard>.bin|.idx   committed shards
    <dir>/.prepare/settings.json      the settings the shards were made with
    <dir>/.prepare/shard_<n>.json     manifest of shard n: its datasets, counts, token limit
    <dir>/.prepare/tmp/<n>/           shard n being written (wiped when a run starts)
    <dir>/.prepare/tmp/<domain>.*     a domain's merged dataset being written
    <dir>/.prepare.lock               held while a run works here: its host and PID
    <dir>/summary.json                written last: the run is complete
    <dir>/data_path.txt               the Megatron --data-path line
    """

    def __init__(self, path: Path, settings: dict[str, Any], dtype: type[np.number]):
        self.path = Path(path).resolve()
        self.work_dir = self.path / WORK_DIR
        self.tmp_dir = self.work_dir / "tmp"
        self.settings = settings
        self.dtype = dtype
        self.summary = self._read_json(self.path / SUMMARY_FILE)
        started_with = self.summary["settings"] if self.summary else self._read_json(self.work_dir / "settings.json")
        if started_with is not None and started_with != settings:
            differing = ", ".join(key for key in settings if settings[key] != started_with.get(key))
            raise DataPrepError(
                f"{self.path} holds a run with different {differing} settings; "
                "choose another --output-dir, or delete it to start over"
            )

    @staticmethod
    def _read_json(path: Path) -> Any:
        return json.loads(path.read_text()) if path.is_file() else None

    def _manifest_file(self, index: int) -> Path:
        return self.work_dir / f"shard_{index:05d}.json"

    def _manifests(self) -> dict[int, dict[str, Any]]:
        manifests = (json.loads(path.read_text()) for path in sorted(self.work_dir.glob("shard_*.json")))
        return {manifest["shard"]: manifest for manifest in manifests}

    def committed_shards(self) -> dict[int, dict[str, Any]]:
        """Complete shards: a manifest, and every dataset it names in place (`.idx` is renamed last)."""
        return {
            index: shard
            for index, shard in self._manifests().items()
            if all((self.path / f"{shard_name(dataset, index)}.idx").is_file() for dataset in shard["datasets"])
        }

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomically(self.work_dir / "settings.json", json.dumps(self.settings, indent=1))
        shutil.rmtree(self.tmp_dir, ignore_errors=True)  # what a killed run was writing
        self.tmp_dir.mkdir()  # also where the merge writes, when every shard was already committed

    def new_shard(self, index: int) -> ShardWriter:
        tmp_dir = self.tmp_dir / f"{index:05d}"
        tmp_dir.mkdir(parents=True)
        return ShardWriter(index, self.path, tmp_dir, self.dtype)

    def commit(self, writer: ShardWriter, rows: int, token_limit: int | None) -> dict[str, Any]:
        """Manifest before renames: every file in place belongs to a manifest that can discard it."""
        manifest = {
            "shard": writer.shard_index,
            "token_limit": token_limit,
            "rows": rows,
            "datasets": {name: vars(counts) for name, counts in writer.finalize().items()},
        }
        write_text_atomically(self._manifest_file(writer.shard_index), json.dumps(manifest))
        writer.publish()
        writer.tmp_dir.rmdir()
        return manifest

    def discard_shards(self, first: int) -> None:
        """Shards `first`, `first + 1`, ...: files before manifests, so no file outlives its manifest."""
        for index, shard in self._manifests().items():
            if index >= first:
                for dataset in shard["datasets"]:
                    remove_dataset(self.path / shard_name(dataset, index))
                self._manifest_file(index).unlink()

    def abandon(self) -> None:
        """After a failure: drop the shards being written, and everything if no data was committed."""
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        if not any(shard["datasets"] for shard in self._manifests().values()):
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def finish(self, merge_shards: bool) -> None:
        """Merge (if asked) and write summary.json, which marks the run complete."""
        shards = [shard for _, shard in sorted(self.committed_shards().items())]
        domains: dict[str, dict[str, Any]] = {}
        for shard in shards:
            for name, counts in shard["datasets"].items():
                domain = domains.setdefault(name, {"documents": 0, "tokens": 0, "files": []})
                domain["documents"] += counts["documents"]
                domain["tokens"] += counts["tokens"]
                domain["files"].append({"prefix": shard_name(name, shard["shard"]), **counts})
        if not domains:
            raise DataPrepError("the input holds no documents with text; check the input and --text-field")
        if merge_shards:
            for name, domain in domains.items():
                merge(
                    [self.path / file["prefix"] for file in domain["files"]], self.path / name, self.tmp_dir, self.dtype
                )
                domain["files"] = [{"prefix": name, "documents": domain["documents"], "tokens": domain["tokens"]}]
        budget = self.settings["output"]["token_budget"]
        documents = sum(domain["documents"] for domain in domains.values())
        tokens = sum(domain["tokens"] for domain in domains.values())
        rows = sum(shard["rows"] for shard in shards)
        self.summary = {
            "settings": self.settings,
            "dtype": np.dtype(self.dtype).name,
            "token_budget": budget,
            "budget_reached": budget is not None and tokens >= budget,
            "documents": documents,
            "tokens": tokens,
            "input_rows": rows,
            "empty_rows_skipped": rows - documents,
            "shards": len(shards),
            "domains": domains,
        }
        write_text_atomically(self.path / SUMMARY_FILE, json.dumps(self.summary, indent=1) + "\n")

    def remove_work_files(self) -> None:
        """After completion: the work folder, and the shards if they were merged."""
        if not self.work_dir.exists():
            return
        if self.settings["output"]["merge_shards"]:
            for index, shard in self._manifests().items():
                for dataset in shard["datasets"]:
                    remove_dataset(self.path / shard_name(dataset, index))
        shutil.rmtree(self.work_dir)


def parse_domain_weights(spec: str) -> dict[str, float] | None:
    """Explicit weights from "a=2,b=1"; None for the "uniform" and "tokens" modes."""
    if spec in ("uniform", "tokens"):
        return None
    weights = {}
    for item in spec.split(","):
        name, _, value = (part.strip() for part in item.partition("="))
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not name or not weight >= 0:
            raise DataPrepError(f"domain weights {spec!r}: use uniform, tokens, or NAME=WEIGHT,... with weights >= 0")
        weights[name] = weight
    if sum(weights.values()) <= 0:
        raise DataPrepError(f"domain weights {spec!r}: at least one weight must be positive")
    return weights


def _check_writable(folder: Path) -> None:
    """A folder the run can write into (made if missing), or one line saying why not."""
    if folder.exists() and not folder.is_dir():
        raise DataPrepError(f"--output-dir {folder} exists and is not a folder; choose another --output-dir")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataPrepError(
            f"--output-dir {folder}: cannot create it ({error.strerror}); choose a folder you can write to"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):  # also false on a read-only file system, even for root
        raise DataPrepError(
            f"--output-dir {folder} is not writable (its permissions or a read-only file system); choose a "
            "folder you can write to, or make it writable"
        )


def data_path_of(summary: dict[str, Any], output_dir: Path, domain_weights: str) -> list[str]:
    """Megatron's --data-path (W1 PREFIX1 W2 PREFIX2 ...): each domain gets its weight, split over its
    shards in proportion to their tokens so a sharded domain samples like one dataset."""
    domains = summary["domains"]
    weights = parse_domain_weights(domain_weights)
    if weights is None:
        weights = {name: (domain["tokens"] if domain_weights == "tokens" else 1.0) for name, domain in domains.items()}
    elif set(weights) != set(domains):
        raise DataPrepError(
            f"domain weights must name exactly the domains {', '.join(domains)} (got {', '.join(weights)}); "
            "rerun with corrected --domain-weights (the data is kept)"
        )
    total = sum(weights.values())
    data_path = []
    for name, domain in domains.items():
        for file in domain["files"]:
            weight = weights[name] / total * file["tokens"] / domain["tokens"]
            if weight > 0:
                data_path += [format(weight, ".10g"), str(output_dir / file["prefix"])]
    return data_path


# ----------------------------------------------------------------------------- command line
def _count(text: str) -> int:
    """A positive whole number, also written like 175e9 or 1.5e6."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite() or value != value.to_integral_value() or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number such as 1000 or 175e9, got {text!r}")
    return int(value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-reweight-prepare",  # also for `python -m megatron_reweight.data.prepare`
        description="Tokenise a Hugging Face dataset or local parquet/jsonl files into Megatron .bin/.idx shards.",
    )
    source = parser.add_argument_group("input")
    one_of = source.add_mutually_exclusive_group(required=True)
    one_of.add_argument("--dataset", help="Hugging Face dataset name, streamed (e.g. HuggingFaceFW/fineweb)")
    one_of.add_argument("--input", nargs="+", metavar="FILE", help="local parquet or jsonl files (globs allowed)")
    source.add_argument("--dataset-config", help="dataset configuration (e.g. sample-350BT)")
    source.add_argument("--split", default="train", help="dataset split (default: train)")
    source.add_argument("--text-field", default="text", help="text field, dotted if nested (default: text)")
    source.add_argument("--domain-field", help="one dataset per value of this field (e.g. meta.redpajama_set_name)")

    tokenizer = parser.add_argument_group("tokenizer")
    tokenizer.add_argument("--tokenizer", required=True, help="tokenizer.json, a folder with one, or a hub repo id")
    tokenizer.add_argument("--eod-id", type=int, help="end-of-document id (default: <|endoftext|> / the eos token)")
    tokenizer.add_argument("--add-special-tokens", action="store_true", help="let the tokenizer add e.g. BOS")
    tokenizer.add_argument(
        "--tokenizer-backend",
        choices=BACKENDS,
        default="auto",
        help="auto (default): tiktoken where it gives the tokenizer's exact ids, else HF tokenizers",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--output-dir", type=Path, required=True,
        help=f"where the .bin/.idx shards, {SUMMARY_FILE} and {DATA_PATH_FILE} (the --data-path to train on) go; "
        "rerun with the same folder to resume",
    )  # fmt: skip
    output.add_argument("--name", default="data", help="dataset name without --domain-field (default: data)")
    output.add_argument(
        "--token-budget", type=_count,
        help="stop at the document reaching this many tokens, e.g. 175e9 (default: no limit, the whole input)",
    )  # fmt: skip
    output.add_argument("--merge-shards", action="store_true", help="concatenate each domain's shards into one")
    output.add_argument("--domain-weights", default="uniform", help="uniform (default), tokens, or NAME=W,...")

    execution = parser.add_argument_group("execution")
    execution.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="default: all cores")
    execution.add_argument("--batch-chars", type=_count, default=1_000_000, help="text per tokenizer call (default 1e6)")
    execution.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    return PrepareConfig(
        input=InputConfig(
            dataset=args.dataset,
            dataset_config=args.dataset_config,
            split=args.split,
            files=args.input or [],
            text_field=args.text_field,
            domain_field=args.domain_field,
        ),
        tokenizer=TokenizerConfig(args.tokenizer, args.eod_id, args.add_special_tokens, args.tokenizer_backend),
        output=OutputConfig(
            output_dir=args.output_dir,
            name=args.name,
            token_budget=args.token_budget,
            merge_shards=args.merge_shards,
            domain_weights=args.domain_weights,
        ),
        workers=args.workers,
        batch_chars=args.batch_chars,
        progress=args.progress,
    )


def main(argv: Iterable[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = config_from_args(_parser().parse_args(argv))
    try:
        prepared = prepare(config)
    except DataPrepError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = prepared.summary
    print(
        f"{prepared.output_dir}: {summary['documents']:,} documents, {summary['tokens']:,} tokens in "
        f"{len(summary['domains'])} domain(s), {summary['shards']} shard(s); data path in "
        f"{prepared.output_dir / DATA_PATH_FILE}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
