"""Rewards to advantages and figures: weighted sums skipping None, groups normalised, figures that read."""

import math

import pytest
import torch

from lmscale.errors import LmscaleError
from lmscale.rollouts.scoring import RewardSet, advantages_and_figures, score, total_reward


def test_a_function_s_none_is_skipped_in_the_weighted_sum():
    per_function = torch.tensor([[1.0, math.nan], [0.0, 2.0], [math.nan, math.nan]], dtype=torch.float64)
    assert total_reward(per_function, [2.0, 0.5]).tolist() == [2.0, 1.0, 0.0]


def test_advantages_are_group_normalised_and_figures_say_how_much_the_groups_teach():
    per_function = torch.tensor([[1.0], [0.0], [1.0], [1.0]], dtype=torch.float64)  # two groups of two
    scored = advantages_and_figures(per_function, [1.0], ["exact"], group_size=2, scale="group")
    first = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert scored.advantages.tolist() == pytest.approx([first, -first, 0.0, 0.0])
    assert scored.figures["zero_spread_groups"] == 0.5  # the second group scored alike: no signal
    assert scored.figures["reward"] == 0.75 and scored.figures["reward/exact"] == 0.75
    unscaled = advantages_and_figures(per_function, [1.0], ["exact"], group_size=2, scale="none")
    assert unscaled.advantages.tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])


def test_score_passes_the_records_fields_and_names_a_function_that_returns_too_few():
    def echo(prompts, completions, answer, completion_ids, **_):
        return [
            float(c == a) + len(ids) / 100
            for c, a, ids in zip(completions, answer, completion_ids, strict=True)
        ]

    rewards = RewardSet([("my.py:echo", echo)], [1.0])
    values = score(rewards, ["1+1=", "1+1="], ["2", "3"], {"answer": ["2", "2"]}, [[5], [6, 7]])
    assert values[:, 0].tolist() == [1.01, 0.02]

    broken = RewardSet([("my.py:short", lambda prompts, completions, **_: [1.0])], [1.0])
    with pytest.raises(LmscaleError, match=r"my.py:short returned 1 values for 2 completions"):
        score(broken, ["a", "b"], ["x", "y"], {}, [[1], [2]])
