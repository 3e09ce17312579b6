"""The .idx consistency check against indexes written and read by megatron-core itself,
then corrupted on disk as a bad writer or a bit flip would."""

import os
import struct

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, IndexedDataset, IndexedDatasetBuilder

import megatron_reweight.data.indexed as indexed
from megatron_reweight.data.indexed import index_inconsistency

DOCUMENTS = [list(range(1, length + 1)) for length in (5, 3, 8, 1, 6, 2, 7, 4, 9, 3)]
HEADER = len(_INDEX_HEADER) + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence and document counts


@pytest.fixture
def prefix(tmp_path) -> str:
    prefix = str(tmp_path / "data")
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for document in DOCUMENTS:
        builder.add_document(np.array(document, dtype=np.int32), [len(document)])
    builder.finalize(f"{prefix}.idx")
    return prefix


def check(prefix: str) -> str | None:
    index = IndexedDataset(prefix).index  # megatron-core's own reader
    size = os.path.getsize(f"{prefix}.bin")
    return index_inconsistency(index.sequence_lengths, index.sequence_pointers, index.document_indices, 4, size)


def overwrite(prefix: str, offset: int, value: bytes) -> None:
    with open(f"{prefix}.idx", "r+b") as file:
        file.seek(offset)
        file.write(value)


@pytest.fixture(params=[4, 1 << 22], ids=["chunks of 4", "one chunk"])
def chunk(request, monkeypatch):
    monkeypatch.setattr(indexed, "_CHECK_CHUNK", request.param)


def test_consistent_index_passes(prefix, chunk):
    assert check(prefix) is None


@pytest.mark.parametrize("sequence", [0, 3, 4, 9])
def test_index_length_x3_is_caught(prefix, chunk, sequence):
    """The fault that trained silently: one document's length tripled, its pointers unchanged."""
    overwrite(prefix, HEADER + 4 * sequence, struct.pack("<i", 3 * len(DOCUMENTS[sequence])))
    message = check(prefix)
    assert message is not None and message.startswith(f"sequence {sequence} has length {3 * len(DOCUMENTS[sequence])}")
    assert (".bin's end" in message) == (sequence == len(DOCUMENTS) - 1)


def test_index_pointer_and_document_faults_are_caught(prefix, chunk):
    sequences = len(DOCUMENTS)
    pointers, documents = HEADER + 4 * sequences, HEADER + 12 * sequences
    overwrite(prefix, pointers + 8 * 6, struct.pack("<q", 4))  # sequence 6 starts inside sequence 0
    assert check(prefix).startswith("sequence 5 has length 2")
    overwrite(prefix, pointers + 8 * 6, struct.pack("<q", 4 * sum(map(len, DOCUMENTS[:6]))))
    assert check(prefix) is None
    overwrite(prefix, documents + 8 * 5, struct.pack("<q", 2))  # boundaries 0,1,2,3,4,2,6,...
    assert check(prefix) == "document 4's boundaries go backwards"
    overwrite(prefix, documents + 8 * 5, struct.pack("<q", 5))
    # A short last boundary (megatron-core's reader asserts on it before any check could run).
    index = IndexedDataset(prefix).index
    short = np.append(index.document_indices[:-1], sequences - 1)
    size = os.path.getsize(f"{prefix}.bin")
    message = index_inconsistency(index.sequence_lengths, index.sequence_pointers, short, 4, size)
    assert message == f"document boundaries 0..{sequences - 1} do not span the {sequences} sequences"


def test_trainer_refuses_an_index_whose_length_disagrees_with_its_pointers(prefix):
    """The trainer's start-up check of every --data-path prefix (it trained on silently before)."""
    from megatron_reweight.training.data import check_indexed_dataset
    from megatron_reweight.training.errors import ConfigError

    assert check_indexed_dataset(prefix) == len(DOCUMENTS)
    overwrite(prefix, HEADER + 4 * 2, struct.pack("<i", 3 * len(DOCUMENTS[2])))
    with pytest.raises(ConfigError, match=rf"{prefix}: corrupt indexed dataset \(.*sequence 2 has length 24 .*rebuild"):
        check_indexed_dataset(prefix)
