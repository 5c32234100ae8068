"""Direct preference optimisation on pairs of replies, against the starting model as reference (its
log-probabilities are computed once, before training: lmscale.objectives.dpo)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmscale.methods.base import Method, MethodFigures

if TYPE_CHECKING:
    from lmscale.config import Config


def dpo_rules(config: Config) -> list[str]:
    """DPO trains on whole preference pairs, both replies of a pair side by side in one micro-batch."""
    data = config.data
    problems = []  # packing, streaming and length warm-up are refused by DataConfig for any record format
    if config.finetune.task != "causal_lm":
        problems.append("finetune.method=dpo needs finetune.task=causal_lm")
    if data.batching == "pad":
        problems.append("data.batching=pad does not apply to preference pairs: use bucket")
    budget = data.max_tokens_per_batch
    if isinstance(budget, int) and budget < 2 * data.max_seq_len:
        problems.append(
            f"data.max_tokens_per_batch={budget} cannot hold a pair of data.max_seq_len={data.max_seq_len} "
            f"replies: raise it to at least {2 * data.max_seq_len}"
        )
    if config.train.label_smoothing:
        problems.append("train.label_smoothing applies to cross-entropy, not DPO: set it to 0")
    return problems


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
        panels=(
            (
                "Preference accuracy",
                "share of pairs ranked right",
                ("pref_accuracy", "eval_pref_accuracy"),
                True,
            ),
            (
                "Rewards",
                "beta x log-ratio to the reference",
                ("rewards_chosen", "rewards_rejected", "rewards_margin", "eval_rewards_margin"),
                False,
            ),
        ),
        summary_keys=("eval_loss", "eval_pref_accuracy", "eval_rewards_margin"),
        console=(("pref_accuracy", "pref_acc", "{:.3f}"), ("rewards_margin", "margin", "{:+.3f}")),
        evaluation=(("rewards_margin", "reward margin", "{:+.3f}"),),
    ),
    objective=dpo_objective,
    rules=dpo_rules,
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
