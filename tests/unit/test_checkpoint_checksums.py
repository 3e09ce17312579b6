"""Checkpoint checksums in one process: faults a disk or a bad copy makes, each named by file.
The reference digest is xxhash's one-shot function on the whole file."""

import os

import pytest
import xxhash

from megatron_reweight.checkpoint_checksums import (
    CHECKSUM_FILE,
    file_digest,
    read_checksums,
    record_checksums,
    size_problems,
    verify_checksums,
)


@pytest.fixture
def checkpoint(tmp_path):
    (tmp_path / "common.pt").write_bytes(b"common state" * 100)
    (tmp_path / ".metadata").write_bytes(b"plan")
    (tmp_path / "__0_0.distcp").write_bytes(os.urandom(3 << 20))  # more than one read block in the test below
    record_checksums(tmp_path)
    return tmp_path


def test_checksum_digest_is_xxh3_128_of_the_whole_file(checkpoint, monkeypatch):
    import megatron_reweight.checkpoint_checksums as checksums

    monkeypatch.setattr(checksums, "_BLOCK", 1 << 20)  # several blocks
    path = checkpoint / "__0_0.distcp"
    assert file_digest(path) == xxhash.xxh3_128_hexdigest(path.read_bytes())


def test_checksums_record_every_file_and_verify_clean(checkpoint):
    files = read_checksums(checkpoint)
    assert sorted(files) == [".metadata", "__0_0.distcp", "common.pt"]
    assert files["common.pt"][0] == 1200
    assert verify_checksums(checkpoint, files) == [] and size_problems(checkpoint, files) == []
    assert read_checksums(checkpoint / "nowhere") is None


def test_checksum_names_overwritten_truncated_and_deleted_files(checkpoint):
    files = read_checksums(checkpoint)
    with open(checkpoint / "__0_0.distcp", "r+b") as file:  # same size, plausible bytes
        file.seek(1 << 20)
        file.write(b"\x00\x00\x80\x3f")
    os.truncate(checkpoint / "common.pt", 600)
    (checkpoint / ".metadata").unlink()
    assert verify_checksums(checkpoint, files) == [
        ".metadata is missing",
        "__0_0.distcp differs from the saved file (checksum mismatch)",
        "common.pt has 600 bytes, 1200 when saved (truncated or overwritten)",
    ]
    assert size_problems(checkpoint, files) == [".metadata is missing", verify_checksums(checkpoint, files)[2]]
    assert (checkpoint / CHECKSUM_FILE).is_file()
