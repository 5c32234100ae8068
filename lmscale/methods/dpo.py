"""Direct preference optimisation on pairs of replies, against the starting model as reference (its
log-probabilities are computed once, before training: lmscale.objectives.dpo)."""

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


def dpo_objective(config: Config) -> Any:
    from lmscale.objectives.dpo import dpo_objective as objective  # torch: imported where training starts

    return objective(config.finetune.dpo)


DPO = Method(
    name="dpo",
    key="finetune.method=dpo",
    data_formats=("preference",),
    figures=MethodFigures(
        loss_name="DPO loss",
        loss_label="DPO loss (nats/pair)",
        panels=(PREFERENCE_PANEL, rewards_panel("beta x log-ratio to the reference")),
        summary_keys=PAIR_SUMMARY,
        console=PAIR_CONSOLE,
        evaluation=PAIR_EVALUATION,
    ),
    objective=dpo_objective,
    rules=pair_rules,
    accuracy_metric="pref_accuracy",
    accuracy_label="preference accuracy",
    perplexity=False,
    target_unit="pairs",
    needs_reference=True,
    # The policy's log-probabilities are compared with the reference's, computed without dropout: dropout
    # noise in the policy would bias that ratio, so (as TRL does) it is off unless model.*_dropout says so.
    dropout_off=True,
    sequence_parallel=False,
)
