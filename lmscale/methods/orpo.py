"""ORPO (odds-ratio preference optimisation): the chosen reply's cross-entropy plus an odds-ratio term that
favours it over the rejected one; no reference model (lmscale.objectives.reference_free)."""

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


def orpo_objective(config: Config) -> Any:
    from lmscale.objectives.reference_free import orpo_objective as objective  # torch: where training starts

    return objective(config.finetune.orpo)


ORPO = Method(
    name="orpo",
    key="finetune.method=orpo",
    data_formats=("preference",),
    figures=MethodFigures(
        loss_name="ORPO loss",
        loss_label="ORPO loss (nats/pair)",
        panels=(
            PREFERENCE_PANEL,
            rewards_panel("lambda x mean log-probability per token"),
            (
                "Odds ratio",
                "log sigmoid of the log odds ratio",
                ("log_odds_ratio", "eval_log_odds_ratio"),
                False,
            ),
        ),
        summary_keys=PAIR_SUMMARY,
        console=PAIR_CONSOLE,
        evaluation=PAIR_EVALUATION,
    ),
    objective=orpo_objective,
    rules=pair_rules,
    accuracy_metric="pref_accuracy",
    accuracy_label="preference accuracy",
    perplexity=False,
    target_unit="pairs",
    dropout_off=True,  # as for DPO: the two replies' scores are compared, and dropout noise would bias that
    sequence_parallel=False,
)
