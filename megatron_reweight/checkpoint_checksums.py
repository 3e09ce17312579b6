"""Checksums of every file of a checkpoint: recorded at save, verified at load.

A file overwritten with plausible values loads and trains on silently, and a truncated one
fails deep inside the reader; a checksum names the file instead. The hash is xxHash's XXH3-128
(non-cryptographic, ~10 GB/s per core: it guards against faults, not against attacks). Each
rank hashes every world-size-th file, so the cost per rank shrinks with the job's size.

    iter_0000100/checksums.json   {"algorithm": "xxh3_128", "files": {"common.pt": [size, hex], ...}}
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as dist
import xxhash

CHECKSUM_FILE = "checksums.json"
_ALGORITHM = "xxh3_128"
_BLOCK = 16 << 20  # bytes read per call: large enough that the hash, not Python, sets the pace


def file_digest(path: Path) -> str:
    digest = xxhash.xxh3_128()
    buffer = memoryview(bytearray(_BLOCK))
    with open(path, "rb", buffering=0) as file:
        while count := file.readinto(buffer):
            digest.update(buffer[:count])
    return digest.hexdigest()


def _checkpoint_files(directory: Path) -> list[str]:
    return sorted(
        str(path.relative_to(directory))
        for path in directory.rglob("*")
        if path.is_file() and path.name != CHECKSUM_FILE
    )


def _share(items: list, group) -> list:
    """This rank's part of `items`: every world-size-th."""
    if not dist.is_initialized():
        return items
    return items[dist.get_rank(group) :: dist.get_world_size(group)]


def _gather(part: dict, group) -> dict:
    """Every rank's part, merged, on every rank."""
    if not dist.is_initialized():
        return part
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, part, group=group)
    return {key: value for part in parts for key, value in part.items()}


def record_checksums(directory: Path, group=None) -> None:
    """Hash the checkpoint's files (all ranks, once the save is complete on every rank) and write
    checksums.json (rank 0)."""
    directory = Path(directory)
    mine = _share(_checkpoint_files(directory), group)
    files = _gather({name: [os.path.getsize(directory / name), file_digest(directory / name)] for name in mine}, group)
    if not dist.is_initialized() or dist.get_rank(group) == 0:
        tmp = directory / f"{CHECKSUM_FILE}.tmp"
        tmp.write_text(json.dumps({"algorithm": _ALGORITHM, "files": dict(sorted(files.items()))}, indent=0))
        os.replace(tmp, directory / CHECKSUM_FILE)


class ChecksumFileError(ValueError):
    """A checksums.json that cannot be read: the checkpoint is damaged."""


def read_checksums(directory: Path) -> dict[str, list] | None:
    """The recorded {file: [size, digest]}, or None where there is no checksums.json."""
    path = Path(directory) / CHECKSUM_FILE
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
        if not all(isinstance(entry, list) and len(entry) == 2 for entry in files.values()):
            raise ValueError("not a table of file: [size, digest]")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ChecksumFileError(f"{CHECKSUM_FILE} cannot be read ({type(error).__name__}: {error})") from None
    return files


def size_problems(directory: Path, files: dict[str, list]) -> list[str]:
    """Missing and truncated (or grown) files, from their sizes alone: cheap enough for every checkpoint."""
    problems = []
    for name, (size, _) in files.items():
        path = Path(directory) / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} has {path.stat().st_size} bytes, {size} when saved (truncated or overwritten)")
    return problems


def verify_checksums(directory: Path, files: dict[str, list], group=None) -> list[str]:
    """What differs from the save, the same list on every rank: missing files, sizes, contents."""
    directory = Path(directory)
    problems = {}
    for name in _share(sorted(files), group):
        problems[name] = size_problems(directory, {name: files[name]})
        if not problems[name] and file_digest(directory / name) != files[name][1]:
            problems[name] = [f"{name} differs from the saved file (checksum mismatch)"]
    gathered = _gather(problems, group)
    return [problem for name in sorted(gathered) for problem in gathered[name]]
