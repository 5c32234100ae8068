"""Rewards of sampled completions: each reward function called once per batch in TRL's signature, their
weighted sum, the group-normalised advantages, and the figures a person watches (reward mean and spread,
per function, the advantages' spread, the share of groups whose completions all scored alike)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmscale.config import GrpoConfig
from lmscale.objectives.grpo import ScaleRewards, group_advantages
from lmscale.rewards import RewardFunction, call_reward, load_rewards, reward_name


@dataclass(frozen=True)
class RewardSet:
    """The run's reward functions (spec, function) and their weights."""

    functions: list[tuple[str, RewardFunction]]
    weights: list[float]

    def names(self) -> list[str]:
        return [reward_name(spec) for spec, _ in self.functions]


def reward_set(config: GrpoConfig) -> RewardSet:
    """The config's reward functions, loaded, with their weights (all 1 unless given)."""
    weights = config.reward_weights or [1.0] * len(config.rewards)
    return RewardSet(load_rewards(config.rewards), list(weights))


def score(
    rewards: RewardSet,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    fields: dict[str, list],
    completion_ids: list[list[int]],
) -> torch.Tensor:
    """[completions, functions] rewards (NaN where a function returned None)."""
    columns = [
        call_reward(spec, function, prompts, completions, {**fields, "completion_ids": completion_ids})
        for spec, function in rewards.functions
    ]
    return torch.tensor(columns, dtype=torch.float64).T.reshape(len(completions), len(columns))


def total_reward(per_function: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """The weighted sum of each completion's rewards, skipping the functions that returned None (TRL's
    nansum: a completion no function judged gets 0)."""
    weighted = per_function * torch.tensor(weights, dtype=per_function.dtype)
    return torch.nansum(weighted, dim=1)


@dataclass
class Scored:
    advantages: torch.Tensor  # per completion, over every rank's completions
    figures: dict[str, float]  # the generation's reward figures, the same on every rank


def advantages_and_figures(
    per_function: torch.Tensor, weights: list[float], names: list[str], group_size: int, scale: ScaleRewards
) -> Scored:
    """Advantages and figures of a whole generation's [completions, functions] rewards (every rank's)."""
    total = total_reward(per_function, weights)
    advantages = group_advantages(total, group_size, scale)
    spreads = total.view(-1, group_size).std(dim=1)
    figures = {
        "reward": float(total.mean()),
        "reward_std": float(total.std()) if total.numel() > 1 else 0.0,
        "advantage_std": float(advantages.std()) if advantages.numel() > 1 else 0.0,
        "zero_spread_groups": float((spreads < 1e-6).double().mean()),
    }
    for column, name in enumerate(names):
        values = per_function[:, column]
        judged = values[~torch.isnan(values)]
        if judged.numel():
            figures[f"reward/{name}"] = float(judged.mean())
            figures[f"reward/{name}_std"] = float(judged.std()) if judged.numel() > 1 else 0.0
    return Scored(advantages, figures)
