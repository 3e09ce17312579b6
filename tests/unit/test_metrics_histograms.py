"""Weight and sample-loss histograms in TensorBoard: an empty distribution (every sample of the
window skipped as non-finite) is left out instead of stopping the run."""

from __future__ import annotations

import torch

from megatron_reweight.training.config import TrainConfig
from megatron_reweight.training.metrics import MetricsLogger


def test_histograms_are_written_and_an_empty_one_is_left_out(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = TrainConfig()
    config.logging.tensorboard_dir = tmp_path
    log = MetricsLogger(True, config)
    log.log_histograms(3, {"weight x batch": torch.tensor([0.5, 1.0, 1.5, 1.0]), "sample loss": torch.empty(0)})
    log.close()

    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
    events.Reload()
    assert events.Tags()["histograms"] == ["train/weight x batch"]
    (event,) = events.Histograms("train/weight x batch")
    assert (event.step, event.histogram_value.num, event.histogram_value.min, event.histogram_value.max) == (
        3,
        4,
        0.5,
        1.5,
    )
