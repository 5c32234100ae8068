"""Direct preference optimisation on pairs of replies, against the starting model as reference (its
log-probabilities are computed once, before training: lmscale.objectives.dpo)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmscale.methods.pairs import pair_method

if TYPE_CHECKING:
    from lmscale.config import Config


def dpo_objective(config: Config) -> Any:
    from lmscale.objectives.dpo import dpo_objective as objective  # torch: imported where training starts

    return objective(config.finetune.dpo)


DPO = pair_method(
    "dpo",
    "DPO loss",
    "beta x log-ratio to the reference",
    dpo_objective,
    needs_reference=True,
    # The policy's log-probabilities are compared with the reference's, computed without dropout: dropout
    # noise in the policy would bias that ratio, so (as TRL does) it is off unless model.*_dropout says so.
    dropout_off=True,
)
