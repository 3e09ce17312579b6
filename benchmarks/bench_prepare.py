"""Data preparation per CPU core and in wall time: the preparation pipeline against Megatron-LM's
own `tools/preprocess_data.py`, side by side in one run, on the same documents and tokenizer.

* megatron_lm_<N>_workers  Megatron-LM's tools/preprocess_data.py, unmodified, from a checkout
            (`--megatron-lm DIR`, or $MEGATRON_LM_PATH), `--workers N --append-eod`, its
            `HuggingFaceTokenizer` on the same tokenizer.json, reading one JSONL file of every
            document: the way a Megatron-LM user prepares data.
* pipeline_<N>_workers     `megatron_reweight.data.prepare` end to end on the same documents
            as one JSONL file per domain (the tool's file cut at the domain boundaries): each
            worker streams whole files through `datasets`, tokenises ~1 MB batches and writes
            the shard; then the summary. Its default backend is tiktoken where that is exact
            (checking 1 document in 64 against HF); `pipeline_hf_1_workers` is the same with HF
            tokenizers' `encode_batch_fast`.

Both run at 1 worker and at one worker per core, and both outputs must hold the same token
stream: the tool's `.bin` and `.idx` are compared byte for byte with the pipeline's merged
output (same documents in the same order, each ending in the end-of-document token).

Tokenizers run single-threaded (TOKENIZERS_PARALLELISM=false, RAYON_NUM_THREADS=1), so one
process is one core. The per-core rate is tokens per CPU-second of the whole process tree,
which a busy machine disturbs far less than wall time; wall-time rates are reported too. The
runs are interleaved and each figure is the best of `--repeats`. Each tool's fixed start-up
(imports, tokenizer loading, process pool) is measured on a one-document input and reported
beside it, since at scale it is paid once per run, not per token.

The projection for 175B tokens on 64 cores is 64 times the pipeline's per-core rate: it
assumes at least 64 input data files and storage and network that keep up.

Run:  python -m benchmarks.bench_prepare --megatron-lm DIR        (a few minutes on 2 CPU cores)
      python -m benchmarks.bench_prepare --megatron-lm DIR --tokenizer sentencepiece-bpe
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
import subprocess
import sys
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
from megatron_reweight.data.indexed import files_of
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


def write_jsonl(path: Path, texts: list[str]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")


def megatron_lm_tokenizer_dir(tokenizer_file: str, eod_token: str, directory: Path) -> Path:
    """A Hugging Face tokenizer folder for Megatron-LM's HuggingFaceTokenizer: the same
    tokenizer.json, and a tokenizer_config.json naming its end-of-document token (the tool's
    --append-eod appends the tokenizer's eos)."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(tokenizer_file, directory / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eod_token}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def megatron_lm_preprocess(megatron_lm: Path, jsonl: Path, tokenizer_dir: Path, prefix: Path, workers: int) -> None:
    """Megatron-LM's tools/preprocess_data.py as its users run it; writes PREFIX_text_document.*."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(megatron_lm), str(REPO_ROOT)]))
    command = [
        sys.executable, str(megatron_lm / "tools" / "preprocess_data.py"), "--input", str(jsonl),
        "--output-prefix", str(prefix), "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", str(tokenizer_dir), "--workers", str(workers), "--append-eod",
        "--log-interval", "1000000",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"Megatron-LM's preprocess_data.py failed ({result.returncode}):\n{result.stderr[-3000:]}")


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
    files: list[Path], tokenizer_spec: str, output_dir: Path, workers: int, backend: str = "auto", merge: bool = False
) -> PreparedData:
    shutil.rmtree(output_dir, ignore_errors=True)
    config = PrepareConfig(
        InputConfig(files=[str(f) for f in files]),
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
    parser.add_argument(
        "--megatron-lm", type=Path, default=os.environ.get("MEGATRON_LM_PATH"),
        help="a Megatron-LM checkout (tools/preprocess_data.py, megatron/training); default $MEGATRON_LM_PATH",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--copies", type=int, default=2, help="read the corpus this many times (dilutes start-up)")
    parser.add_argument("--documents", type=int, help="only the first N documents of each domain (a smoke run)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "results" / "bench_prepare.json")
    args = parser.parse_args()
    if args.megatron_lm is None or not (args.megatron_lm / "tools" / "preprocess_data.py").is_file():
        parser.error("--megatron-lm DIR (or $MEGATRON_LM_PATH): a Megatron-LM checkout with tools/preprocess_data.py")

    demo = ensure_demo_data(args.root)
    tokenizer_spec = args.tokenizer or str(demo.tokenizer_path)
    parquet = [args.root / "corpus" / f"{domain}.parquet" for domain in demo.domains] * args.copies
    domain_texts = [pq.read_table(file, columns=["text"]).column("text").to_pylist()[: args.documents] for file in parquet]
    texts = [text for part in domain_texts for text in part]
    cores = len(os.sched_getaffinity(0))
    workers = sorted({1, cores})

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if tokenizer_spec == "sentencepiece-bpe":
            tokenizer_spec = train_sentencepiece_bpe(texts, scratch / "tokenizer.json")
        tokenizer, tokenizer_file = load_tokenizer(tokenizer_spec)
        eod_token = tokenizer.id_to_token(resolve_eod_id(tokenizer, tokenizer_file, None))
        tokenizer_dir = megatron_lm_tokenizer_dir(str(tokenizer_file), eod_token, scratch / "hf_tokenizer")
        # The same documents in the same order: one file for the tool, one per domain and copy for the pipeline.
        everything = scratch / "corpus.jsonl"
        write_jsonl(everything, texts)
        files = []
        for index, part in enumerate(domain_texts):
            files.append(scratch / "parts" / f"{index:02d}.jsonl")
            files[-1].parent.mkdir(exist_ok=True)
            write_jsonl(files[-1], part)
        one_document = scratch / "one.jsonl"
        write_jsonl(one_document, texts[:1])

        runs, startups = {}, {}
        for n in workers:
            runs[f"megatron_lm_{n}_workers"] = partial(
                megatron_lm_preprocess, args.megatron_lm, everything, tokenizer_dir, scratch / f"mlm{n}", n
            )
            runs[f"pipeline_{n}_workers"] = partial(pipeline, files, tokenizer_spec, scratch / f"p{n}", n)
            startups[f"megatron_lm_{n}_workers"] = partial(
                megatron_lm_preprocess, args.megatron_lm, one_document, tokenizer_dir, scratch / f"mlm_one{n}", n
            )
            startups[f"pipeline_{n}_workers"] = partial(pipeline, [one_document], tokenizer_spec, scratch / f"p_one{n}", n)
        runs["pipeline_hf_1_workers"] = partial(pipeline, files, tokenizer_spec, scratch / "hf", 1, "hf")
        timings = best_of_interleaved(runs, args.repeats)
        startup_timings = best_of_interleaved(startups, args.repeats)
        check = pipeline(files, tokenizer_spec, scratch / "check", cores, merge=True)
        identical = {
            f"megatron_lm_{n}_workers": [
                theirs.read_bytes() == ours.read_bytes()
                for theirs, ours in zip(files_of(scratch / f"mlm{n}_text_document"), files_of(scratch / "check" / "corpus"))
            ]
            for n in workers
        }

    summary = check.summary
    tokens = summary["tokens"]
    # Megatron-LM: its workers and the writing main process; the pipeline works in-process at 1 worker.
    processes = {name: int(name.split("_")[-2]) + (name.startswith("megatron_lm") or not name.endswith("_1_workers")) for name in runs}
    measured = {name: rates(tokens, timing, processes[name]) for name, timing in timings.items()}
    for name, timing in startup_timings.items():
        measured[name]["startup_cpu_s"] = round(timing.cpu_s, 3)
        measured[name]["startup_wall_s"] = round(timing.wall_s, 3)
        measured[name]["tokens_per_cpu_s_after_startup"] = round(tokens / max(timings[name].cpu_s - timing.cpu_s, 1e-9))
    per_core = measured["pipeline_1_workers"]["tokens_per_cpu_s"]
    peer = measured["megatron_lm_1_workers"]
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
        "megatron_lm_tool": "tools/preprocess_data.py --tokenizer-type HuggingFaceTokenizer --append-eod",
        # [.bin identical, .idx identical] per worker count.
        "megatron_lm_output_identical": identical,
        "results": measured,
        "speedup_per_core": round(per_core / peer["tokens_per_cpu_s"], 2),
        "speedup_per_core_after_startup": round(
            measured["pipeline_1_workers"]["tokens_per_cpu_s_after_startup"] / peer["tokens_per_cpu_s_after_startup"], 2
        ),
        "speedup_per_core_hf_backend": round(measured["pipeline_hf_1_workers"]["tokens_per_cpu_s"] / peer["tokens_per_cpu_s"], 2),
        "speedup_wall_at_each_worker_count": {
            n: round(measured[f"pipeline_{n}_workers"]["tokens_per_s"] / measured[f"megatron_lm_{n}_workers"]["tokens_per_s"], 2)
            for n in workers
        },
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
            "load_average_1min": os.getloadavg()[0],
        },
        "command": "python -m benchmarks.bench_prepare --megatron-lm MEGATRON_LM_PATH"
        + (
            f" --tokenizer {args.tokenizer if args.tokenizer == 'sentencepiece-bpe' else 'TOKENIZER_JSON'}"
            if args.tokenizer
            else ""
        ),
    }
    print(json.dumps(report, indent=1))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    if not all(all(pair) for pair in identical.values()):
        raise SystemExit(f"Megatron-LM's output differs from the pipeline's: {identical}")


if __name__ == "__main__":
    main()
