import math

import pytest

from megatron_reweight import TemperatureSchedule


def test_paper_schedule_holds_warmup_value_then_drops():
    schedule = TemperatureSchedule(r=0.4, warmup_steps=500)  # paper 1: r = 100 during warm-up
    assert [schedule(s) for s in (0, 499, 500, 10_000)] == [100.0, 100.0, 0.4, 0.4]


def test_linear_and_cosine_anneals_reach_the_end_value():
    linear = TemperatureSchedule(r=1.0, warmup_steps=10, warmup_r=11.0, anneal="linear", anneal_steps=100)
    cosine = TemperatureSchedule(r=1.0, warmup_steps=10, warmup_r=11.0, anneal="cosine", anneal_steps=100)
    assert linear(5) == 11.0 and linear(60) == pytest.approx(6.0) and linear(110) == linear(5000) == 1.0
    assert cosine(60) == pytest.approx(6.0)  # the midpoint is shared
    assert cosine(35) == pytest.approx(1.0 + 10.0 * (1 + math.cos(math.pi * 0.25)) / 2)
    assert cosine(35) > linear(35)  # cosine leaves the warm-up value more slowly


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0.0}, "r must be a finite number > 0"),
        ({"warmup_r": -1.0}, "warmup_r must be a finite number > 0"),
        ({"anneal": "exp"}, "unknown temperature anneal"),
        ({"anneal": "cosine"}, "needs anneal_steps > 0"),
        ({"warmup_steps": -1}, ">= 0"),
    ],
)
def test_bad_schedules_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TemperatureSchedule(**kwargs)
