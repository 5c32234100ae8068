"""Reward models: a scalar head (a one-output sequence classifier) trained on preference pairs to score the
chosen reply above the rejected one (lmscale.objectives.reward); `lmscale score` rates new records with it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmscale.methods.pairs import pair_method

if TYPE_CHECKING:
    from lmscale.config import Config


def reward_objective(config: Config) -> Any:
    from lmscale.objectives.reward import reward_objective as objective  # torch: where training starts

    return objective(config.finetune.reward)


REWARD = pair_method(
    "reward",
    "reward-model loss",
    "the reward head's output",
    reward_objective,
    class_head=True,
    class_names=("reward",),
    tensor_parallel=False,  # AutoTP splits a language model's output layer, not a class head
)
