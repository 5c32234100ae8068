"""What the preference-pair methods (DPO, ORPO, SimPO) share: their config rules and how their figures show."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lmscale.methods.base import Method, MethodFigures, Panel

if TYPE_CHECKING:
    from lmscale.config import Config


def pair_rules(config: Config) -> list[str]:
    """Whole two-row records (a preference pair's replies, an unpaired record's completion and KL sequence)
    side by side in one micro-batch."""
    data, key = config.data, f"finetune.method={config.finetune.method}"
    problems = []  # packing, streaming and length warm-up are refused by DataConfig for any record format
    if config.finetune.task != "causal_lm":
        problems.append(f"{key} needs finetune.task=causal_lm")
    if data.batching == "pad":
        problems.append(f"data.batching=pad does not apply to {key}, which plans whole records: use bucket")
    budget = data.max_tokens_per_batch
    if isinstance(budget, int) and budget < 2 * data.max_seq_len:
        problems.append(
            f"data.max_tokens_per_batch={budget} cannot hold a record's two sequences of data.max_seq_len="
            f"{data.max_seq_len} tokens: raise it to at least {2 * data.max_seq_len}"
        )
    if config.train.label_smoothing:
        problems.append(f"train.label_smoothing applies to cross-entropy, not {key}: set it to 0")
    return problems


PREFERENCE_PANEL: Panel = (
    "Preference accuracy",
    "share of pairs ranked right",
    ("pref_accuracy", "eval_pref_accuracy"),
    True,
)


def rewards_panel(reward: str) -> Panel:
    """The chosen and rejected rewards and their margin; `reward` says what a reward is."""
    keys = ("rewards_chosen", "rewards_rejected", "rewards_margin", "eval_rewards_margin")
    return ("Rewards", reward, keys, False)


PAIR_SUMMARY = ("eval_loss", "eval_pref_accuracy", "eval_rewards_margin")
PAIR_CONSOLE = (("pref_accuracy", "pref_acc", "{:.3f}"), ("rewards_margin", "margin", "{:+.3f}"))
PAIR_EVALUATION = (("rewards_margin", "reward margin", "{:+.3f}"),)


def pair_method(
    name: str,
    loss_name: str,
    reward: str,
    objective: Callable[[Config], Any],
    extra_panels: tuple[Panel, ...] = (),
    **flags: Any,
) -> Method:
    """A method on preference pairs: what they all share (data, rules, figures, closing line), with its own
    name, loss, what its reward is, its objective factory and any other Method flags."""
    return Method(
        name=name,
        key=f"finetune.method={name}",
        data_formats=("preference",),
        figures=MethodFigures(
            loss_name=loss_name,
            loss_label=f"{loss_name} (nats/pair)",
            panels=(PREFERENCE_PANEL, rewards_panel(reward), *extra_panels),
            summary_keys=PAIR_SUMMARY,
            console=PAIR_CONSOLE,
            evaluation=PAIR_EVALUATION,
        ),
        objective=objective,
        rules=pair_rules,
        accuracy_metric="pref_accuracy",
        accuracy_label="preference accuracy",
        perplexity=False,
        target_unit="pairs",
        sequence_parallel=False,  # both replies of a pair are scored whole, on one rank
        **flags,
    )
