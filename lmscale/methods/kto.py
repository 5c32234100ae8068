"""Kahneman-Tversky optimisation on unpaired records, each completion labelled desirable or not, against
the starting model as reference (scored once, before training, as for DPO: lmscale.objectives.kto)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmscale.methods.base import Method, MethodFigures
from lmscale.methods.pairs import pair_rules, rewards_panel

if TYPE_CHECKING:
    from lmscale.config import Config


def kto_objective(config: Config) -> Any:
    from lmscale.objectives.kto import kto_objective as objective  # torch: imported where training starts

    return objective(config.finetune.kto)


KTO = Method(
    name="kto",
    key="finetune.method=kto",
    data_formats=("unpaired",),
    figures=MethodFigures(
        loss_name="KTO loss",
        loss_label="KTO loss (per record)",
        panels=(
            (
                "Label accuracy",
                "share of records whose reward has their label's sign",
                ("label_accuracy", "eval_label_accuracy"),
                True,
            ),  # fmt: skip
            rewards_panel("beta x log-ratio to the reference"),
            ("KL estimate", "policy vs reference, mismatched pairs", ("kl", "eval_kl"), True),
        ),
        summary_keys=("eval_loss", "eval_label_accuracy", "eval_rewards_margin", "eval_kl"),
        console=(
            ("label_accuracy", "label_acc", "{:.3f}"),
            ("rewards_margin", "margin", "{:+.3f}"),
            ("kl", "kl", "{:.3f}"),
        ),
        evaluation=(
            ("rewards_chosen", "reward desirable", "{:+.3f}"),
            ("rewards_rejected", "undesirable", "{:+.3f}"),
        ),
    ),
    objective=kto_objective,
    rules=pair_rules,  # a record's completion and KL sequence are planned together, as a pair's replies
    accuracy_metric="label_accuracy",
    accuracy_label="label accuracy",
    perplexity=False,
    target_unit="records",
    needs_reference=True,
    dropout_off=True,  # rewards are log-ratios to the reference, scored without dropout: noise would bias them
    sequence_parallel=False,  # both rows of a record are scored whole, on one rank
)
