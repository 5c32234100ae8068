"""The loss: next-token (or class) cross-entropy summed over the targets, so a step's mean is exact
however its tokens are spread over micro-batches and ranks; and the forward pass that feeds it."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from lmscale.data.batches import IGNORE_INDEX

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


def forward(engine: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of one batch, on the engine's device."""
    inputs = {k: batch[k].to(engine.device, non_blocking=True) for k in MODEL_INPUTS if k in batch}
    return engine(**inputs).logits, batch["labels"].to(engine.device, non_blocking=True)


def forward_summed_loss(engine: Any, batch: dict, label_smoothing: float = 0.0) -> torch.Tensor:
    logits, labels = forward(engine, batch)
    return summed_loss(logits, labels, label_smoothing)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: an untrained model's exp(loss) can overflow
