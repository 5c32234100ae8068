"""Training methods as plugins: `METHODS` maps each name to its `Method` (lmscale.methods.base), one module
each. Everything that differs between methods (the data they train on, the objective, a reference pass,
what is logged, the closing line and `lmscale eval`'s summary) is read from the run's Method; nothing else
in lmscale branches on a method's name. To add a method, see the README's "Adding a training method"."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmscale.methods.base import Method, MethodFigures, Panel
from lmscale.methods.classification import CLASSIFICATION
from lmscale.methods.dpo import DPO
from lmscale.methods.grpo import GRPO
from lmscale.methods.kto import KTO
from lmscale.methods.orpo import ORPO
from lmscale.methods.reward import REWARD
from lmscale.methods.sft import SFT
from lmscale.methods.simpo import SIMPO

if TYPE_CHECKING:
    from lmscale.config import Config, FinetuneConfig

METHODS: dict[str, Method] = {
    "sft": SFT,
    "classification": CLASSIFICATION,
    "dpo": DPO,
    "orpo": ORPO,
    "simpo": SIMPO,
    "reward": REWARD,
    "kto": KTO,
    "grpo": GRPO,
}

__all__ = [
    "CLASSIFICATION",
    "DPO",
    "GRPO",
    "KTO",
    "METHODS",
    "ORPO",
    "REWARD",
    "SFT",
    "SIMPO",
    "Method",
    "MethodFigures",
    "Panel",
    "method_for",
    "method_of_saved",
    "method_problems",
]


def method_for(finetune: FinetuneConfig) -> Method:
    """The run's method: finetune.method, with finetune.task=classification selecting the class head."""
    if finetune.task == "classification" and finetune.method == "sft":
        return CLASSIFICATION
    return METHODS[finetune.method]


def method_of_saved(config: dict[str, Any] | None) -> Method:
    """The method of a run from its saved config.yaml (a dict; runs from before a key existed: SFT)."""
    finetune = (config or {}).get("finetune") or {}
    if finetune.get("task") == "classification" and finetune.get("method", "sft") == "sft":
        return CLASSIFICATION
    return METHODS.get(finetune.get("method", "sft"), SFT)


def method_problems(config: Config) -> list[str]:
    """Why the config's method cannot train as configured; with no method chosen (SFT), a data.format that
    belongs to one other method names that method."""
    method = method_for(config.finetune)
    owners = [m.key for m in METHODS.values() if config.data.format in m.data_formats]
    if method is SFT and config.data.format not in SFT.data_formats and owners:
        others = f" (or {', '.join(o.split('=')[-1] for o in owners[1:])})" if len(owners) > 1 else ""
        return [
            f"data.format={config.data.format} is for another method: set {owners[0]}{others}, or another data.format"
        ]
    return method.problems(config)


def console_extras(metrics: dict[str, Any]) -> str:
    """Every method's figures that a step logged, for its console line."""
    shown = dict.fromkeys(
        entry for method in METHODS.values() for entry in method.figures.console
    )  # once each
    parts = [f"{label} {fmt.format(metrics[key])}" for key, label, fmt in shown if key in metrics]
    return "".join(f", {part}" for part in parts)
