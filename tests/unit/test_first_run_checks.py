"""Start-up checks a new user meets: errors name what the user gave (--train-iters, --load) and
a missing optional package is named with its extra."""

from __future__ import annotations

import sys

import pytest

from megatron_reweight.training import ConfigError, build_parser, config_from_args
from megatron_reweight.training.checkpointing import TRACKER_FILENAME, read_tracker


def error(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_args(build_parser().parse_args(argv), world_size=1)
    return str(info.value)


def test_errors_name_the_flag_the_user_gave():
    # The preset's warm-ups are cut to --train-iters: they must not be what the error is about.
    assert error(["--mock-data", "--train-iters", "0"]) == "--train-iters must be > 0, got 0"
    assert error(["--mock-data", "--train-iters", "-3"]) == "--train-iters must be > 0, got -3"


def test_load_must_be_a_readable_checkpoint_directory(tmp_path):
    some_file = tmp_path / "corpus.jsonl"
    some_file.write_text("{}\n")
    assert error(["--mock-data", "--load", str(some_file)]) == f"--load {some_file}: exists and is not a directory"
    (tmp_path / "ckpt" / TRACKER_FILENAME).mkdir(parents=True)  # a tracker that cannot be read
    with pytest.raises(ConfigError, match=f"^--load {tmp_path / 'ckpt'}: cannot read .*{TRACKER_FILENAME} "):
        read_tracker(tmp_path / "ckpt")
    assert read_tracker(tmp_path / "nothing") is None  # nothing to load: the run warns and starts afresh


def test_missing_extras_are_named_at_start_up(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert error(["--mock-data", "--tensorboard-dir", str(tmp_path)]) == (
        "--tensorboard-dir needs tensorboard: pip install 'megatron-reweight[train]'"
    )
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    assert error([]) == (
        "the demo corpus (no --data-path given) needs pyarrow: pip install 'megatron-reweight[data]', "
        "or pass --data-path or --mock-data"
    )
