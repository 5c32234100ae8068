"""What each training method logs, and how its figures are shown: the report's panels, the summary's rows
and the console line's extras. A new method adds one entry to METHOD_FIGURES."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# A dashboard panel: (title, y label, metric keys, y axis starts at zero).
Panel = tuple[str, str, tuple[str, ...], bool]


@dataclass(frozen=True)
class MethodFigures:
    loss_label: str  # what the loss measures, with its unit
    panels: tuple[Panel, ...]  # the method's own panels, after the common ones
    summary_keys: tuple[str, ...]  # held-out figures of the last evaluation the summary reports
    console: tuple[tuple[str, str, str], ...] = ()  # (metric, label, format) added to each step's line


LANGUAGE_MODEL = MethodFigures(
    loss_label="loss (nats/token)",
    panels=(),
    summary_keys=("eval_loss", "eval_ppl"),
)
CLASSIFICATION = MethodFigures(
    loss_label="cross-entropy (nats/row)",
    panels=(("Accuracy", "share of rows classified right", ("accuracy", "eval_accuracy"), True),),
    summary_keys=("eval_loss", "eval_accuracy"),
    console=(("accuracy", "accuracy", "{:.3f}"),),
)
DPO = MethodFigures(
    loss_label="DPO loss (nats/pair)",
    panels=(
        ("Preference accuracy", "share of pairs ranked right", ("pref_accuracy", "eval_pref_accuracy"), True),
        (
            "Rewards",
            "beta x log-ratio to the reference",
            ("rewards_chosen", "rewards_rejected", "rewards_margin", "eval_rewards_margin"),
            False,
        ),
    ),
    summary_keys=("eval_loss", "eval_pref_accuracy", "eval_rewards_margin"),
    console=(("pref_accuracy", "pref_acc", "{:.3f}"), ("rewards_margin", "margin", "{:+.3f}")),
)

METHOD_FIGURES = {"lm": LANGUAGE_MODEL, "classification": CLASSIFICATION, "dpo": DPO}


def method_of(config: dict[str, Any] | None) -> str:
    """The METHOD_FIGURES key of a run, from its saved config (a dict as in config.yaml)."""
    finetune = (config or {}).get("finetune") or {}
    if finetune.get("method") == "dpo":
        return "dpo"
    if finetune.get("task") == "classification":
        return "classification"
    return "lm"


def figures_of(config: dict[str, Any] | None) -> MethodFigures:
    return METHOD_FIGURES[method_of(config)]


def console_extras(metrics: dict[str, Any]) -> str:
    """The method's figures for a step's console line (every method's that the step logged)."""
    parts = [
        f"{label} {fmt.format(metrics[key])}"
        for figures in METHOD_FIGURES.values()
        for key, label, fmt in figures.console
        if key in metrics
    ]
    return "".join(f", {part}" for part in parts)
