"""Tokenisation throughput per CPU core: the preparation pipeline vs a Megatron-LM-style loop.

Both turn the demo corpus into one Megatron indexed dataset with the same tokenizer and
megatron-core's `IndexedDatasetBuilder`, and must produce byte-identical files.

* loop      Megatron-LM's tools/preprocess_data.py per core: one document at a time,
            `tokenizer.encode(text).ids + [eod]`, `builder.add_document(ids, [len(ids)])`.
            Its texts are already in memory (no file reading is timed), which favours it.
* pipeline  `megatron_reweight.data.prepare` end to end: each worker streams whole parquet files
            through `datasets`, tokenises ~1 MB batches and writes the shard; then the summary.
            Its default backend is tiktoken where that is exact (checking 1 document in 64
            against HF); `pipeline_hf` is the same run with HF tokenizers' `encode_batch_fast`.

Tokenizers run single-threaded (TOKENIZERS_PARALLELISM=false, RAYON_NUM_THREADS=1), so one
process is one core. The per-core rate is tokens per CPU-second (the process and its workers),
which a busy machine disturbs far less than wall time; wall-time rates are reported too. The
runs are interleaved and each figure is the best of `--repeats`.

The main process only schedules (its CPU time is reported, and does not grow with the data), so
the projection for 175B tokens on 64 cores is 64 times the per-core rate: it assumes at least 64
input data files and storage and network that keep up.

Run:  python -m benchmarks.bench_prepare            (about a minute on 2 CPU cores)
      python -m benchmarks.bench_prepare --tokenizer sentencepiece-bpe
            a Llama-2-shaped tokenizer (SentencePiece-style BPE, 32k, byte fallback), trained
            on the demo corpus: the HF path, as for the 7B run's Llama-2 tokenizer
Out:  docs/results/bench_prepare.json (or --output)
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before tokenizers starts its thread pool
os.environ["RAYON_NUM_THREADS"] = "1"

import argparse
import json
import platform
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
import tiktoken
import tokenizers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from megatron_reweight.data.demo import ensure_demo_data
from megatron_reweight.data.encoding import load_tokenizer, resolve_eod_id
from megatron_reweight.data.indexed import IndexedDatasetBuilder, files_of, token_dtype
from megatron_reweight.data.prepare import OutputConfig, PrepareConfig, PreparedData, TokenizerConfig, prepare
from megatron_reweight.data.sources import InputConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
PROJECTED_TOKENS = 175e9  # the 7B run's budget
PROJECTED_CORES = 64


@dataclass
class Timing:
    wall_s: float
    main_cpu_s: float  # this process
    workers_cpu_s: float  # its finished child processes

    @property
    def cpu_s(self) -> float:
        return self.main_cpu_s + self.workers_cpu_s


def timed(run: Callable[[], None]) -> Timing:
    def cpu(who: int) -> float:
        usage = resource.getrusage(who)
        return usage.ru_utime + usage.ru_stime

    main, workers, wall = cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
    run()
    return Timing(time.perf_counter() - wall, cpu(resource.RUSAGE_SELF) - main, cpu(resource.RUSAGE_CHILDREN) - workers)


def best_of_interleaved(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, Timing]:
    """Each run `repeats` times, taking turns, so load from elsewhere hits all alike; best of each."""
    timings: dict[str, list[Timing]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            timings[name].append(timed(run))
    return {
        name: Timing(*(min(getattr(t, field) for t in measured) for field in ("wall_s", "main_cpu_s", "workers_cpu_s")))
        for name, measured in timings.items()
    }


def megatron_lm_loop(texts: list[str], tokenizer_spec: str, prefix: Path) -> None:
    """One document at a time, as Megatron-LM's preprocess_data.py does on each core."""
    tokenizer, tokenizer_file = load_tokenizer(tokenizer_spec)
    eod = resolve_eod_id(tokenizer, tokenizer_file, None)
    bin_file, idx_file = files_of(prefix)
    builder = IndexedDatasetBuilder(str(bin_file), dtype=token_dtype(tokenizer.get_vocab_size(with_added_tokens=True)))
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        ids.append(eod)
        builder.add_document(ids, [len(ids)])
    builder.finalize(str(idx_file))


def train_sentencepiece_bpe(texts: list[str], path: Path) -> str:
    """Llama 2's tokenizer.json shape: '▁' for spaces by the normalizer, no pre-tokenizer (the
    document is one word), BPE over characters with byte fallback, a BOS template; 32k tokens."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")  # training words only
    specials = ["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256))]
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=32000, special_tokens=specials))
    tokenizer.pre_tokenizer = None
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(path))
    return str(path)


def pipeline(
    files: list[str], tokenizer_spec: str, output_dir: Path, workers: int, backend: str = "auto", merge: bool = False
) -> PreparedData:
    shutil.rmtree(output_dir, ignore_errors=True)
    config = PrepareConfig(
        InputConfig(files=files),
        TokenizerConfig(tokenizer_spec, backend=backend),
        OutputConfig(output_dir=output_dir, name="corpus", merge_shards=merge),
        workers=workers,
        progress=False,
    )
    return prepare(config)


def rates(tokens: int, timing: Timing, processes: int) -> dict:
    return {
        "processes": processes,
        "wall_s": round(timing.wall_s, 3),
        "cpu_s": round(timing.cpu_s, 3),
        "main_process_cpu_s": round(timing.main_cpu_s, 3),
        "tokens_per_cpu_s": round(tokens / timing.cpu_s),
        "tokens_per_s": round(tokens / timing.wall_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=REPO_ROOT / "data" / "demo", help="demo corpus folder")
    parser.add_argument("--tokenizer", help="tokenizer.json to use, or sentencepiece-bpe (default: the demo tokenizer)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--copies", type=int, default=2, help="read the corpus this many times (dilutes start-up)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "results" / "bench_prepare.json")
    args = parser.parse_args()

    demo = ensure_demo_data(args.root)
    tokenizer_spec = args.tokenizer or str(demo.tokenizer_path)
    files = [str(args.root / "corpus" / f"{domain}.parquet") for domain in demo.domains] * args.copies
    texts = [text for file in files for text in pq.read_table(file, columns=["text"]).column("text").to_pylist()]
    cores = len(os.sched_getaffinity(0))

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if tokenizer_spec == "sentencepiece-bpe":
            tokenizer_spec = train_sentencepiece_bpe(texts, scratch / "tokenizer.json")
        runs = {
            "loop": lambda: megatron_lm_loop(texts, tokenizer_spec, scratch / "loop"),
            "pipeline_hf_1_workers": partial(pipeline, files, tokenizer_spec, scratch / "hf", 1, "hf"),
        }
        for workers in sorted({1, cores}):
            runs[f"pipeline_{workers}_workers"] = partial(
                pipeline, files, tokenizer_spec, scratch / f"p{workers}", workers
            )
        timings = best_of_interleaved(runs, args.repeats)
        check = pipeline(files, tokenizer_spec, scratch / "check", cores, merge=True)
        identical = all(
            loop_file.read_bytes() == merged_file.read_bytes()
            for loop_file, merged_file in zip(files_of(scratch / "loop"), files_of(scratch / "check" / "corpus"))
        )

    summary = check.summary
    tokens = summary["tokens"]
    processes = {"loop": 1, "pipeline_hf_1_workers": 1, "pipeline_1_workers": 1, f"pipeline_{cores}_workers": cores + 1}
    measured = {name: rates(tokens, timing, processes[name]) for name, timing in timings.items()}
    per_core = measured["pipeline_1_workers"]["tokens_per_cpu_s"]
    report = {
        "corpus": {
            "domains": demo.domains,
            "copies": args.copies,
            "documents": summary["documents"],
            "characters": sum(map(len, texts)),
            "tokens": tokens,
        },
        "tokenizer": {key: summary["settings"]["tokenizer"][key] for key in ("vocab_size", "sha256")},
        "pipeline_backend": check.tokenizer_backend,
        "output_identical_to_loop": identical,
        "results": measured,
        "speedup_per_core": round(per_core / measured["loop"]["tokens_per_cpu_s"], 2),
        "speedup_per_core_hf_backend": round(
            measured["pipeline_hf_1_workers"]["tokens_per_cpu_s"] / measured["loop"]["tokens_per_cpu_s"], 2
        ),
        "projection": {
            "tokens": PROJECTED_TOKENS,
            "cores": PROJECTED_CORES,
            "tokens_per_core_s": per_core,
            "hours": round(PROJECTED_TOKENS / (per_core * PROJECTED_CORES) / 3600, 2),
        },
        "machine": {
            "cpus": cores,
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "tokenizers": tokenizers.__version__,
            "tiktoken": tiktoken.__version__,
        },
        "command": "python -m benchmarks.bench_prepare"
        + (
            f" --tokenizer {args.tokenizer if args.tokenizer == 'sentencepiece-bpe' else 'TOKENIZER_JSON'}"
            if args.tokenizer
            else ""
        ),
    }
    print(json.dumps(report, indent=1))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
