"""Cost of the safety checks on data and checkpoints of real size.

* checksums the checkpoint checksums (XXH3-128 of every file) against the save itself: a
            real megatron-core GPTModel of the `tiny` and the `llama-1.4b` preset's shape (bf16,
            32k vocabulary) saved with dist_checkpointing (torch_dist, as the trainer does) on one
            rank, then `record_checksums` and `verify_checksums` of the saved files. One rank
            writes the whole model here; in a job each rank writes and hashes its share, so the
            ratio of hashing to saving is the same. Best of `--repeats`, interleaved.
* index     the .idx consistency check (`index_inconsistency`) on a synthetic index of
            `--sequences` documents (FineWeb's 175B-token sample-350BT part is ~170M), written in
            megatron-core's format and read through megatron-core's own memory-mapping reader,
            as the trainer opens it. Timed warm (the index in the page cache) and, where the
            process may drop caches (root), cold; best of `--repeats`.

Run:  python -m benchmarks.bench_fault_checks       (~5 min on 2 CPU cores, 8 GB of memory, 4 GB of disk)
Out:  docs/results/bench_fault_checks.json (or --output)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType, _IndexReader

from megatron_reweight.checkpoint_checksums import record_checksums, read_checksums, verify_checksums
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


def build_model(preset: str):
    """The preset's GPTModel on this process (a world of one), bf16 as a GPU run's weights."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_reweight.model import build_llama, llama_transformer_config
    from megatron_reweight.training.config import preset_config

    shape = preset_config(preset).model
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
        model_parallel_cuda_manual_seed(0)
    with torch.no_grad():
        return build_llama(shape, llama_transformer_config(shape, bf16=True), 32000, use_transformer_engine=False)


def time_checksums(preset: str, folder: Path, repeats: int) -> dict:
    from megatron.core import dist_checkpointing

    from megatron_reweight.processes import bind_checkpoint_writer_to_this_process

    model = build_model(preset)
    bind_checkpoint_writer_to_this_process()
    save, record, verify = [], [], []
    for repeat in range(repeats):
        directory = folder / f"{preset}_{repeat}"
        directory.mkdir()
        started = time.perf_counter()
        dist_checkpointing.save(model.sharded_state_dict(), str(directory), sharded_strategy=("torch_dist", 1))
        save.append(time.perf_counter() - started)
        started = time.perf_counter()
        record_checksums(directory)
        record.append(time.perf_counter() - started)
        started = time.perf_counter()
        assert verify_checksums(directory, read_checksums(directory)) == []
        verify.append(time.perf_counter() - started)
        size = sum(path.stat().st_size for path in directory.iterdir())
        shutil.rmtree(directory)
    del model
    return {
        "checkpoint_bytes": size,
        "save_seconds": round(min(save), 3),
        "checksum_at_save_seconds": round(min(record), 3),
        "checksum_share_of_save": round(min(record) / min(save), 4),
        "verify_at_load_seconds": round(min(verify), 3),
        "hash_GB_per_s": round(size / min(record) / 1e9, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=50_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=["tiny", "llama-1.4b"])
    parser.add_argument("--output", type=Path, default=Path("docs/results/bench_fault_checks.json"))
    args = parser.parse_args()

    import torch.distributed as dist

    from megatron_reweight.cpu import enable_megatron_core_on_cpu

    enable_megatron_core_on_cpu()
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=0, world_size=1)
        checksums = {preset: time_checksums(preset, Path(folder), args.repeats) for preset in args.presets}
        path = Path(folder) / "large.idx"
        bin_size = write_index(path, args.sequences)
        warm = min(time_check(path, bin_size, cold=False) for _ in range(args.repeats))
        cold = min(time_check(path, bin_size, cold=True) for _ in range(args.repeats))
        idx_bytes = path.stat().st_size
    per_million = warm / args.sequences * 1e6
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "checksums": checksums,
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
