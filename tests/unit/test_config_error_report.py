"""How a bad-input error is reported by each rank (the torchrun behaviour: tests/integration/test_torchrun_errors.py)."""

from __future__ import annotations

import time

import pytest

from megatron_reweight.training import errors
from megatron_reweight.training.errors import ConfigError, report_config_error


def test_rank_0_reports_at_once(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(errors, "REPORT_GRACE_SECONDS", 5.0)
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_status:
        report_config_error(ConfigError("--hidden-size 96 is bad"))
    assert time.monotonic() - started < 5.0  # rank 0 does not wait
    assert exit_status.value.code == 2
    assert capsys.readouterr().err == "pretrain_llama.py: error: --hidden-size 96 is bad\n"


def test_another_rank_still_running_after_the_wait_reports_its_own_error(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setattr(errors, "REPORT_GRACE_SECONDS", 0.0)
    with pytest.raises(SystemExit) as exit_status:
        report_config_error(ConfigError("--data-path prefix /data/web: missing /data/web.idx"))
    assert exit_status.value.code == 2
    expected = "pretrain_llama.py: error (rank 3): --data-path prefix /data/web: missing /data/web.idx\n"
    assert capsys.readouterr().err == expected
