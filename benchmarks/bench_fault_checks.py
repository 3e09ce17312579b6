"""Cost of the start-up safety checks on data of real size.

* index     the .idx consistency check (`index_inconsistency`) on a synthetic index of
            `--sequences` documents (FineWeb's 175B-token sample-350BT part is ~170M), written in
            megatron-core's format and read through megatron-core's own memory-mapping reader,
            as the trainer opens it. Timed warm (the index in the page cache) and, where the
            process may drop caches (root), cold; best of `--repeats`.

Run:  python -m benchmarks.bench_fault_checks               (~1 min on 2 CPU cores, 2 GB of disk)
Out:  docs/results/bench_fault_checks.json (or --output)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType, _IndexReader

from megatron_reweight.data.indexed import index_inconsistency


def write_index(path: Path, sequences: int, seed: int = 0) -> int:
    """A consistent .idx of `sequences` single-sequence documents (uint16 tokens); the .bin's size."""
    lengths = np.random.default_rng(seed).integers(50, 4000, size=sequences, dtype=np.int32)
    pointers = np.zeros(sequences, dtype=np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * 2, out=pointers[1:])
    with open(path, "wb") as file:
        file.write(_INDEX_HEADER + struct.pack("<Q", 1) + struct.pack("<B", DType.code_from_dtype(np.uint16)))
        file.write(struct.pack("<Q", sequences) + struct.pack("<Q", sequences + 1))
        file.write(lengths.tobytes())
        file.write(pointers.tobytes())
        file.write(np.arange(sequences + 1, dtype=np.int64).tobytes())
    return int(pointers[-1]) + 2 * int(lengths[-1])


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def time_check(path: Path, bin_size: int, cold: bool) -> float:
    if cold and not drop_caches():
        return float("nan")
    started = time.perf_counter()
    index = _IndexReader(str(path), multimodal=False)
    problem = index_inconsistency(index.sequence_lengths, index.sequence_pointers, index.document_indices, 2, bin_size)
    seconds = time.perf_counter() - started
    assert problem is None, problem
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=50_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("docs/results/bench_fault_checks.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "large.idx"
        bin_size = write_index(path, args.sequences)
        warm = min(time_check(path, bin_size, cold=False) for _ in range(args.repeats))
        cold = min(time_check(path, bin_size, cold=True) for _ in range(args.repeats))
        idx_bytes = path.stat().st_size
    per_million = warm / args.sequences * 1e6
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "index": {
            "sequences": args.sequences,
            "idx_bytes": idx_bytes,
            "warm_seconds": round(warm, 3),
            "cold_seconds": None if np.isnan(cold) else round(cold, 3),
            "warm_seconds_per_million_documents": round(per_million, 4),
            "warm_seconds_for_170M_documents": round(per_million * 170, 2),
        },
    }
    print(json.dumps(result, indent=1))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
