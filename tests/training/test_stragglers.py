"""The straggler figures: which rank is slowest and by how much, and when a warning names it."""

import time

import pytest
import torch

from lmscale.training.stragglers import (
    STRAGGLER_WINDOWS,
    ForwardClock,
    RankTimes,
    StragglerWatch,
    describe,
    node_of,
    slowest,
)


def test_the_slowest_rank_lags_the_median_of_the_others():
    times = [RankTimes(0.01, 0.20), RankTimes(0.30, 0.20), RankTimes(0.02, 0.21), RankTimes(0.01, 0.19)]
    straggler = slowest(times)
    assert straggler.rank == 1 and straggler.lag_s == pytest.approx(0.50 - 0.21)
    # two ranks: the lag is the whole difference, not half of it
    assert slowest([RankTimes(0.0, 0.1), RankTimes(0.3, 0.1)]).lag_s == pytest.approx(0.3)


def lagging(rank: int, lag_s: float):
    times = [RankTimes(0.0, 0.1)] * 4
    times[rank] = RankTimes(lag_s, 0.1)
    return slowest(times)


def test_a_rank_is_named_once_after_it_stays_clearly_slowest():
    watch = StragglerWatch()
    said = [watch.observe(lagging(2, 0.3), step_time_s=0.5) for _ in range(STRAGGLER_WINDOWS + 2)]
    assert said[: STRAGGLER_WINDOWS - 1] == [None] * (STRAGGLER_WINDOWS - 1)
    assert "rank 2" in said[STRAGGLER_WINDOWS - 1] and "data arrives late" in said[STRAGGLER_WINDOWS - 1]
    assert said[STRAGGLER_WINDOWS:] == [None, None]  # once per rank
    # another rank's streak is its own
    assert [watch.observe(lagging(3, 0.3), 0.5) for _ in range(STRAGGLER_WINDOWS)][-1] is not None


@pytest.mark.parametrize(
    ("lags", "step_time_s"),
    [
        ([0.3, 0.3, 0.0, 0.3, 0.3], 0.5),  # a window in the middle without a clear lag breaks the streak
        ([0.04] * 5, 0.2),  # below the 0.05 s floor: noise
        ([0.2] * 5, 3.0),  # below 10% of a long step
    ],
)
def test_noise_and_broken_streaks_name_nobody(lags, step_time_s):
    watch = StragglerWatch()
    assert all(watch.observe(lagging(1, lag), step_time_s) is None for lag in lags)


def test_a_slow_forward_pass_points_at_the_device_and_the_node_is_named(monkeypatch):
    monkeypatch.setenv("LOCAL_SIZE", "4")  # the deepspeed launcher's ranks per node
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert node_of(5) == 1
    text = describe(slowest([RankTimes(0.0, 0.1)] * 5 + [RankTimes(0.0, 0.6)]), 3, 1.0)
    assert text.startswith("straggler: rank 5 (node 1)") and "forward passes are slow" in text
    monkeypatch.delenv("LOCAL_SIZE")
    assert node_of(5) is None


def test_the_forward_clock_counts_what_it_brackets_and_starts_again():
    clock = ForwardClock(torch.device("cpu"))
    with clock.measure():
        time.sleep(0.05)
    time.sleep(0.05)  # outside: not counted
    assert 0.04 < clock.take_s() < 0.09
    assert clock.take_s() == 0.0


def test_the_cause_is_the_part_that_lags_not_the_larger_part():
    # forward passes take longer than the data wait everywhere; only the data wait is late on rank 1
    straggler = slowest([RankTimes(0.0, 0.12), RankTimes(0.10, 0.12), RankTimes(0.0, 0.13)])
    assert straggler.late_data and "data arrives late" in describe(straggler, 3, 0.4)
