"""SimPO: the margin between the chosen and rejected replies' mean log-probability per token, scaled by beta,
should exceed gamma; no reference model (lmscale.objectives.reference_free)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmscale.methods.pairs import pair_method

if TYPE_CHECKING:
    from lmscale.config import Config


def simpo_objective(config: Config) -> Any:
    from lmscale.objectives.reference_free import simpo_objective as objective  # torch: where training starts

    return objective(config.finetune.simpo)


SIMPO = pair_method(
    "simpo",
    "SimPO loss",
    "beta x mean log-probability per token",
    simpo_objective,
    dropout_off=True,  # the two replies' scores are compared: dropout noise would bias the margin
)
