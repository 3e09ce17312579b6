"""--wandb-project/--wandb-exp-name/--wandb-save-dir: Weights & Biases in offline mode (no network)
gets the same scalars as TensorBoard, the per-domain weights among them, and the same weight and
sample-loss histograms. Both are read back from what the run wrote: TensorBoard's event files with
tensorboard's reader, the W&B run from its transaction log (run-*.wandb)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.helpers.pretrain import SMALL_MODEL, data_args, make_corpus, run

pytest.importorskip("wandb")

HISTOGRAMS = ("train/weight x batch", "train/sample loss")


def wandb_history(run_dir: Path) -> dict[int, dict]:
    """The history rows of an offline run by step. The transaction log is LevelDB's log format
    (as `wandb sync` reads it): a 7-byte file header, then 32 KiB blocks of records, each with a
    7-byte header (checksum, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    block, position, pieces, rows = 32768, 7, [], {}
    while position + 7 <= len(data):
        left_in_block = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if left_in_block < 7 or (length == 0 and kind == 0):  # block padding
            position += left_in_block
            continue
        pieces.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            pieces = []
            if record.WhichOneof("record_type") == "history":
                row = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
                }
                rows.setdefault(row["_step"], {}).update(row)
    return rows


def tensorboard_events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def test_wandb_offline_logs_what_tensorboard_logs(tmp_path, monkeypatch):
    corpus = make_corpus(tmp_path / "corpus")
    args = SMALL_MODEL + data_args(corpus, tmp_path / "cache") + [
        "--train-iters", "4", "--log-interval", "1", "--eval-interval", "2", "--eval-iters", "1",
        "--tensorboard-dir", str(tmp_path / "tb"), "--wandb-project", "reweight-test",
        "--wandb-exp-name", "offline-check", "--wandb-save-dir", str(tmp_path / "wandb"),
    ]  # fmt: skip
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: the run is written locally only
    run(1, args)

    (run_dir,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*")
    rows = wandb_history(run_dir)
    events = tensorboard_events(tmp_path / "tb")
    scalar_tags = set(events.Tags()["scalars"])
    assert {"train/lm loss", "train/weighted loss", "valid/all/loss"} <= scalar_tags
    assert {f"train/weight x batch/{domain}" for domain in corpus["domains"]} <= scalar_tags
    wandb_scalars = {key for row in rows.values() for key, value in row.items()
                     if not key.startswith("_") and isinstance(value, (int, float))}  # fmt: skip
    assert wandb_scalars == scalar_tags
    for tag in scalar_tags:
        for event in events.Scalars(tag):
            assert rows[event.step][tag] == pytest.approx(event.value, rel=1e-6, abs=1e-7), (tag, event.step)

    for tag in HISTOGRAMS:
        tensorboard_steps = {event.step: event.histogram_value for event in events.Histograms(tag)}
        assert sorted(tensorboard_steps) == [1, 2, 3, 4], tag
        for step, histogram in tensorboard_steps.items():
            counted = rows[step][f"{tag}/values"]
            assert rows[step][f"{tag}/_type"] == "histogram"
            assert sum(counted) == histogram.num > 0, (tag, step)
            assert min(rows[step][f"{tag}/bins"]) == pytest.approx(histogram.min, rel=1e-5, abs=1e-6)
            assert max(rows[step][f"{tag}/bins"]) == pytest.approx(histogram.max, rel=1e-5, abs=1e-6)
