"""Megatron indexed datasets (`PREFIX.bin` + `PREFIX.idx`), written crash-safely.

Files are built under temporary names and renamed into place only when complete (`.bin` first,
then `.idx`), so a `PREFIX.idx` always has a complete `PREFIX.bin` beside it and an interrupted
write never looks like a dataset.
"""

from __future__ import annotations

import gc
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

with warnings.catch_warnings():  # megatron.core's package import warns about GPU-only extras we do not use
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder


def token_dtype(vocab_size: int) -> type[np.number]:
    """The smallest dtype megatron-core stores token ids of this vocabulary in (uint16 or int32)."""
    return DType.optimal_dtype(vocab_size)


def shard_name(dataset: str, shard_index: int) -> str:
    return f"{dataset}_{shard_index:05d}"


def files_of(prefix: Path) -> tuple[Path, Path]:
    return Path(f"{prefix}.bin"), Path(f"{prefix}.idx")


@dataclass
class DatasetStats:
    documents: int = 0
    tokens: int = 0


class ShardWriter:
    """One shard of the output: an indexed dataset `<dataset>_<shard>` per dataset (domain) that
    has documents in it, built in `tmp_dir` (`finalize`) and then moved to `output_dir` (`publish`)."""

    def __init__(self, shard_index: int, output_dir: Path, tmp_dir: Path, dtype: type[np.number]):
        self.shard_index = shard_index
        self.output_dir = output_dir
        self.tmp_dir = tmp_dir
        self.dtype = dtype
        self.builders: dict[str, IndexedDatasetBuilder] = {}
        self.stats: dict[str, DatasetStats] = {}
        self.tokens = 0

    def add(self, dataset: str, tokens: np.ndarray) -> None:
        if dataset not in self.builders:
            bin_file, _ = files_of(self.tmp_dir / shard_name(dataset, self.shard_index))
            self.builders[dataset] = IndexedDatasetBuilder(str(bin_file), dtype=self.dtype)
            self.stats[dataset] = DatasetStats()
        self.builders[dataset].add_document(tokens, [len(tokens)])
        self.stats[dataset].documents += 1
        self.stats[dataset].tokens += len(tokens)
        self.tokens += len(tokens)

    def finalize(self) -> dict[str, DatasetStats]:
        for dataset, builder in self.builders.items():
            _, idx_file = files_of(self.tmp_dir / shard_name(dataset, self.shard_index))
            builder.finalize(str(idx_file))
        return self.stats

    def publish(self) -> None:
        for dataset in self.builders:
            name = shard_name(dataset, self.shard_index)
            publish(self.tmp_dir / name, self.output_dir / name)


def merge(prefixes: list[Path], target: Path, tmp_dir: Path, dtype: type[np.number]) -> None:
    """Concatenate indexed datasets, in order, into one at `target`."""
    tmp_prefix = tmp_dir / target.name
    bin_file, idx_file = files_of(tmp_prefix)
    builder = IndexedDatasetBuilder(str(bin_file), dtype=dtype)
    # add_index runs a full gc.collect() per dataset; with torch and megatron-core loaded that is
    # ~0.25 s each. Frozen objects are skipped by the collector, so freeze the long-lived heap.
    gc.freeze()
    try:
        for prefix in prefixes:
            builder.add_index(str(prefix))
    finally:
        gc.unfreeze()
    builder.finalize(str(idx_file))
    publish(tmp_prefix, target)


def publish(tmp_prefix: Path, prefix: Path) -> None:
    """Durably move a finished dataset from its temporary prefix to its final one."""
    for tmp_file, final_file in zip(files_of(tmp_prefix), files_of(prefix)):
        sync_file(tmp_file)
        os.replace(tmp_file, final_file)


def sync_file(path: Path) -> None:
    """Flush a file's contents to disk, so a rename after it never exposes a truncated file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomically(path: Path, text: str) -> None:
    tmp_path = path.with_name(path.name + ".tmp")
    tmp_path.write_text(text)
    sync_file(tmp_path)
    os.replace(tmp_path, path)


def index_inconsistency(
    lengths: np.ndarray, pointers: np.ndarray, document_indices: np.ndarray, itemsize: int, bin_size: int
) -> str | None:
    """What is wrong inside an index, or None: every sequence must start where the previous one
    ends (pointers are byte offsets, lengths are tokens), the last must end at the .bin's size, and
    the document boundaries must run from 0 to the sequence count without going back.

    Vectorised in chunks (bounded memory on memory-mapped arrays of any size)."""
    count = len(lengths)
    if len(pointers) != count:
        return f"{count} sequence lengths but {len(pointers)} pointers"
    if count and pointers[0] != 0:
        return f"the first sequence starts at byte {int(pointers[0])}, not 0"
    for start in range(0, count, _CHECK_CHUNK):
        stop = min(start + _CHECK_CHUNK, count)
        chunk_lengths = lengths[start:stop].astype(np.int64)
        ends = pointers[start:stop] + chunk_lengths * itemsize
        next_starts = np.empty_like(ends)
        next_starts[:-1] = pointers[start + 1 : stop]
        next_starts[-1] = pointers[stop] if stop < count else bin_size
        bad = np.flatnonzero((ends != next_starts) | (chunk_lengths < 0))
        if len(bad):
            i = start + int(bad[0])
            following = "the .bin's end" if i == count - 1 else f"sequence {i + 1}'s start"
            return (
                f"sequence {i} has length {int(lengths[i])} (ends at byte {int(ends[bad[0]])}) but "
                f"{following} is byte {int(next_starts[bad[0]])}"
            )
    if len(document_indices) == 0 or document_indices[0] != 0 or document_indices[-1] != count:
        bounds = f"{int(document_indices[0])}..{int(document_indices[-1])}" if len(document_indices) else "none"
        return f"document boundaries {bounds} do not span the {count} sequences"
    for start in range(0, len(document_indices) - 1, _CHECK_CHUNK):
        steps = np.diff(document_indices[start : start + _CHECK_CHUNK + 1])
        if (steps < 0).any():
            return f"document {start + int(np.flatnonzero(steps < 0)[0])}'s boundaries go backwards"
    return None


_CHECK_CHUNK = 1 << 22  # entries per vectorised step: 32 MiB of int64 temporaries


def remove_dataset(prefix: Path) -> None:
    for path in files_of(prefix):
        path.unlink(missing_ok=True)
