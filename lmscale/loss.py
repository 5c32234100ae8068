"""The loss: next-token (or class) cross-entropy summed over the targets, so a step's mean is exact
however its tokens are spread over micro-batches and ranks; and the forward pass that feeds it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lmscale.data.batches import IGNORE_INDEX, Batch

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")  # whichever the batch has


def summed_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Next-token cross-entropy summed (not averaged) over the non-ignored targets, in fp32."""
    shifted_logits = logits[:, :-1].float().reshape(-1, logits.size(-1))
    return F.cross_entropy(
        shifted_logits,
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
        label_smoothing=label_smoothing,
    )


def summed_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy summed over the targets: next tokens (labels per token) or classes (one label per row)."""
    if labels.dim() == 2:
        return summed_token_loss(logits, labels, label_smoothing)
    return F.cross_entropy(
        logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=label_smoothing
    )


def forward(engine: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of one batch, on the engine's device."""
    inputs = {k: batch[k].to(engine.device, non_blocking=True) for k in MODEL_INPUTS if k in batch}
    return engine(**inputs).logits, batch["labels"].to(engine.device, non_blocking=True)


@dataclass
class LossParts:
    """One micro-batch's loss, summed over its targets (tokens, documents or preference pairs), and the
    figures reported as means over the same targets (accuracy, rewards)."""

    summed: torch.Tensor
    targets: int
    sums: dict[str, torch.Tensor] = field(default_factory=dict)


Objective = Callable[[Any, Batch], LossParts]  # (engine, batch) -> its loss parts


def cross_entropy_objective(label_smoothing: float = 0.0) -> Objective:
    """Supervised training: cross-entropy of the next tokens, or of the class (with its accuracy)."""

    def objective(engine: Any, batch: Batch) -> LossParts:
        logits, labels = forward(engine, batch)
        sums = {}
        if labels.dim() == 1:  # ignored (filler) rows never match -100
            sums["accuracy"] = (logits.argmax(dim=-1) == labels).sum()
        return LossParts(summed_loss(logits, labels, label_smoothing), batch.local_targets, sums)

    return objective


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: an untrained model's exp(loss) can overflow
