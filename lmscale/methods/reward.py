"""Reward models: a scalar head (a one-output sequence classifier) trained on preference pairs to score the
chosen reply above the rejected one (lmscale.objectives.reward); `lmscale score` rates new records with it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmscale.methods.base import Method, MethodFigures
from lmscale.methods.pairs import (
    PAIR_CONSOLE,
    PAIR_EVALUATION,
    PAIR_SUMMARY,
    PREFERENCE_PANEL,
    pair_rules,
    rewards_panel,
)

if TYPE_CHECKING:
    from lmscale.config import Config


def reward_objective(config: Config) -> Any:
    from lmscale.objectives.reward import reward_objective as objective  # torch: where training starts

    return objective(config.finetune.reward)


REWARD = Method(
    name="reward",
    key="finetune.method=reward",
    data_formats=("preference",),
    figures=MethodFigures(
        loss_name="reward-model loss",
        loss_label="Bradley-Terry loss (nats/pair)",
        panels=(PREFERENCE_PANEL, rewards_panel("the reward head's output")),
        summary_keys=PAIR_SUMMARY,
        console=PAIR_CONSOLE,
        evaluation=PAIR_EVALUATION,
    ),
    objective=reward_objective,
    rules=pair_rules,
    accuracy_metric="pref_accuracy",
    accuracy_label="preference accuracy",
    perplexity=False,
    class_head=True,
    class_names=("reward",),
    target_unit="pairs",
    tensor_parallel=False,  # AutoTP splits a language model's output layer, not a class head
    sequence_parallel=False,
)
