"""SimPO: the margin between the chosen and rejected replies' mean log-probability per token, scaled by beta,
should exceed gamma; no reference model (lmscale.objectives.reference_free)."""

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


def simpo_objective(config: Config) -> Any:
    from lmscale.objectives.reference_free import simpo_objective as objective  # torch: where training starts

    return objective(config.finetune.simpo)


SIMPO = Method(
    name="simpo",
    key="finetune.method=simpo",
    data_formats=("preference",),
    figures=MethodFigures(
        loss_name="SimPO loss",
        loss_label="SimPO loss (nats/pair)",
        panels=(PREFERENCE_PANEL, rewards_panel("beta x mean log-probability per token")),
        summary_keys=PAIR_SUMMARY,
        console=PAIR_CONSOLE,
        evaluation=PAIR_EVALUATION,
    ),
    objective=simpo_objective,
    rules=pair_rules,
    accuracy_metric="pref_accuracy",
    accuracy_label="preference accuracy",
    perplexity=False,
    target_unit="pairs",
    dropout_off=True,  # the two replies' scores are compared: dropout noise would bias the margin
    sequence_parallel=False,
)
