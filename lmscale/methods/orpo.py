"""ORPO (odds-ratio preference optimisation): the chosen reply's cross-entropy plus an odds-ratio term that
favours it over the rejected one; no reference model (lmscale.objectives.reference_free)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmscale.methods.pairs import pair_method

if TYPE_CHECKING:
    from lmscale.config import Config


def orpo_objective(config: Config) -> Any:
    from lmscale.objectives.reference_free import orpo_objective as objective  # torch: where training starts

    return objective(config.finetune.orpo)


ORPO = pair_method(
    "orpo",
    "ORPO loss",
    "lambda x mean log-probability per token",
    orpo_objective,
    extra_panels=(
        ("Odds ratio", "log sigmoid of the log odds ratio", ("log_odds_ratio", "eval_log_odds_ratio"), False),
    ),
    dropout_off=True,  # as for DPO: the two replies' scores are compared, and dropout noise would bias that
)
