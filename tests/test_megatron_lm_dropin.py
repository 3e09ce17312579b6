from pathlib import Path

from distributed import torchrun


def test_megatron_lm_loss_func_reads_flags_and_iteration_and_gathers_over_dp():
    result = torchrun(2, Path(__file__).parent / "workers" / "megatron_lm_dropin.py")
    assert result.stdout.count("drop-in ok") == 2
