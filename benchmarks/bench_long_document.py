"""Peak memory of tokenising one very long document (a book, a code file, a log), with the
document encoded in pieces (`DocumentEncoder`'s default where cutting is exact) and whole.

Each measurement runs in a fresh process: the document (the demo corpus's text repeated to
`--sizes` MB), its tokenizer (the demo corpus's byte-level BPE) and the chosen backend, then one
`DocumentEncoder` call; the process's peak resident memory (ru_maxrss) before and after the call,
the seconds, and the token count. Encoding whole is measured only up to `--whole-up-to` MB (it
took over 4 GB at 30 MB). The pieces' ids are checked equal to the whole document's where both ran.

Run:  python -m benchmarks.bench_long_document         (needs the demo corpus: scripts/setup.sh)
Out:  docs/results/bench_long_document.json (or --output)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

DEMO = Path("data/demo")


def measure(size_mb: int, backend: str, whole: bool) -> dict:
    """In this (fresh) process: tokenise one document of `size_mb` MB."""
    import numpy as np
    import pyarrow.parquet as pq

    from megatron_reweight.data.encoding import DocumentEncoder, load_tokenizer, select_backend

    tokenizer, _ = load_tokenizer(str(DEMO / "tokenizer.json"))
    texts = [t for file in sorted((DEMO / "corpus").glob("*.parquet")) for t in pq.read_table(file).column("text").to_pylist()]
    corpus = " ".join(texts)
    document = (corpus * (size_mb * 2**20 // len(corpus) + 1))[: size_mb * 2**20]
    del texts, corpus
    fast = select_backend(tokenizer, backend, add_special_tokens=False)
    encoder = DocumentEncoder(tokenizer, 0, np.uint16, add_special_tokens=False, fast=fast)
    if whole:
        encoder.piece_chars = None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    tokens, _ = encoder([document])
    seconds = time.perf_counter() - start
    return {
        "size_mb": size_mb, "backend": backend, "encoded": "whole" if whole else "in pieces",
        "peak_rss_mb_before": round(before), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "seconds": round(seconds, 1), "tokens": int(tokens.size), "sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[30, 300], help="document sizes in MB")
    parser.add_argument("--whole-up-to", type=int, default=30, help="also encode whole documents up to this size (MB)")
    parser.add_argument("--backends", nargs="+", default=["tiktoken", "hf"], choices=["tiktoken", "hf"])
    parser.add_argument("--output", type=Path, default=Path("docs/results/bench_long_document.json"))
    parser.add_argument("--worker", nargs=3, metavar=("SIZE", "BACKEND", "WHOLE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        size, backend, whole = args.worker
        print(json.dumps(measure(int(size), backend, whole == "whole")))
        return
    rows = []
    for size in args.sizes:
        for backend in args.backends:
            for whole in ([False, True] if size <= args.whole_up_to else [False]):
                worker = [sys.executable, "-m", "benchmarks.bench_long_document", "--worker", str(size), backend,
                          "whole" if whole else "pieces"]  # fmt: skip
                row = json.loads(subprocess.run(worker, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
                print(json.dumps(row), flush=True)
                rows.append(row)
    for size in args.sizes:
        hashes = {row["sha256"] for row in rows if row["size_mb"] == size}
        assert len(hashes) == 1, f"{size} MB: the backends or the pieces gave other ids"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
