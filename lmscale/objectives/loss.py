"""The loss: next-token (or class) cross-entropy summed over the targets, so a step's mean is exact
however its tokens are spread over micro-batches and ranks; and the forward pass that feeds it."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lmscale.data.batches import IGNORE_INDEX, Batch
from lmscale.model.expert_routing import routed_tokens
from lmscale.objectives.balancing import sliced_balancing_loss
from lmscale.objectives.fused_head import has_fused_head, loss_targets, summed_fused_loss
from lmscale.parallel.ulysses import sequence_group

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")  # whichever the batch has


def aligned_token_loss(
    logits: torch.Tensor, next_tokens: torch.Tensor, label_smoothing: float = 0.0, chunked: bool = False
) -> torch.Tensor:
    """Cross-entropy summed over the targets, when `next_tokens[i]` is already the target of `logits[i]`.

    `chunked` uses DeepSpeed's blocked cross-entropy: it keeps one fp32 log-sum-exp per token and
    recomputes the softmax block by block in backward, so no fp32 [tokens, vocab] tensor exists.
    """
    rows, targets = logits.reshape(-1, logits.size(-1)), next_tokens.reshape(-1)
    if chunked:  # imported here: deepspeed must not load before the accelerator is chosen
        from deepspeed.runtime.chunked_cross_entropy import chunked_cross_entropy

        return chunked_cross_entropy(rows, targets, IGNORE_INDEX, reduction="sum")
    return F.cross_entropy(
        rows.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=label_smoothing
    )


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Each position's own target (the next label; the last position gets an ignored one). Shifting the
    labels instead of the logits avoids `logits[:, :-1]`, which would copy the whole logits tensor."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def chunked_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`summed_token_loss` without fp32 [tokens, vocab] tensors (see `aligned_token_loss`)."""
    return aligned_token_loss(logits, next_token_targets(labels), chunked=True)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([rows, width - 1] log-probabilities of each next token in fp32, 0 where it is no target; the mask of
    targets): position i predicts label i + 1. cross_entropy without reduction is -log p of each target
    without a [rows, width, vocab] log-softmax copy."""
    targets = labels[:, 1:]
    logps = -F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(targets.shape)
    return logps, targets != IGNORE_INDEX


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


def summed_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, chunked: bool = False
) -> torch.Tensor:
    """Cross-entropy summed over the targets: next tokens (labels per token) or classes (one label per row).
    `chunked` computes the next-token loss blockwise (a class head's logits are small already)."""
    if labels.dim() == 2 and chunked:
        return chunked_token_loss(logits, labels)
    if labels.dim() == 2:
        return summed_token_loss(logits, labels, label_smoothing)
    return F.cross_entropy(
        logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=label_smoothing
    )


def model_outputs(engine: Any, batch: Batch) -> tuple[Any, torch.Tensor]:
    """(the model's outputs, labels) of one batch, on the engine's device; for a sequence-parallel slice the
    labels are already each position's own next-token target (`Batch.labels_aligned`)."""
    return engine(**model_inputs(engine, batch)), batch["labels"].to(engine.device, non_blocking=True)


def model_inputs(engine: Any, batch: Batch) -> dict[str, torch.Tensor]:
    """The batch's model inputs (whichever of MODEL_INPUTS it has), on the engine's device."""
    return {k: batch[k].to(engine.device, non_blocking=True) for k in MODEL_INPUTS if k in batch}


def fused_model_loss(engine: Any, batch: Batch) -> tuple[Any, torch.Tensor]:
    """(the model's outputs, the summed next-token loss) of one batch through the fused output layer
    (lmscale.objectives.fused_head): the logits never exist whole."""
    inputs = model_inputs(engine, batch)
    # A sequence-parallel slice's targets are aligned with its positions already.
    targets = batch["labels"] if batch.labels_aligned else next_token_targets(batch["labels"])
    with loss_targets(engine.module, targets.to(engine.device, non_blocking=True)):
        outputs = engine(**inputs)
    return outputs, summed_fused_loss(outputs)


def forward(engine: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of one batch (see `model_outputs`)."""
    outputs, labels = model_outputs(engine, batch)
    return outputs.logits, labels


@dataclass
class LossParts:
    """One micro-batch's loss, summed over its targets (tokens, documents or preference pairs), and the
    figures reported as means over the same targets (accuracy, rewards)."""

    summed: torch.Tensor
    targets: int
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    expert_tokens: torch.Tensor | None = None  # a mixture-of-experts model's [layers, experts] routing counts


Objective = Callable[[Any, Batch], LossParts]  # (engine, batch) -> its loss parts

# A figure X whose sums also hold X:count is a mean over that count (KTO's rewards of its desirable records),
# not over the loss targets.
COUNT = ":count"


def per_count(name: str, values: torch.Tensor) -> dict[str, torch.Tensor]:
    """The sums of a figure reported as the mean of `values` over their own number."""
    return {name: values.sum(), name + COUNT: values.new_tensor(float(values.numel()))}


def figure_means(sums: dict[str, float], targets: float) -> dict[str, float]:
    """Each figure's mean: over its own count where it has one (left out when that is 0), else the targets.
    Where the rewards of two groups are such means (KTO's desirable and undesirable records), their margin is
    the difference of the means, as TRL logs it."""
    means = {}
    for name, total in sums.items():
        count = sums.get(name + COUNT, targets)
        if not name.endswith(COUNT) and count > 0:
            means[name] = float(total) / float(count)
    groups = ("rewards_chosen", "rewards_rejected")
    if "rewards_margin" not in sums and all(g in means and g + COUNT in sums for g in groups):
        means["rewards_margin"] = means["rewards_chosen"] - means["rewards_rejected"]
    return means


def add_sums(totals: dict[str, torch.Tensor], sums: dict[str, torch.Tensor]) -> None:
    """Add an objective's figure sums into running totals (float64, detached)."""
    for name, value in sums.items():
        totals[name] = totals.get(name, 0) + value.detach().double()


def objective_totals(
    engine: Any, batches: Iterable[Batch], objective: Objective, progress: Callable[[], None] = lambda: None
) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
    """(summed loss, targets, figure sums) of an objective over batches, for this process only; `progress`
    is called after each batch."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    sums: dict[str, torch.Tensor] = {}
    targets = 0
    for batch in batches:
        parts = objective(engine, batch)
        loss_sum += parts.summed.detach().double()
        targets += parts.targets
        add_sums(sums, parts.sums)
        progress()
    return loss_sum, targets, sums


def cross_entropy_objective(
    label_smoothing: float = 0.0, chunked: bool = False, router_loss: bool = False
) -> Objective:
    """Supervised training: cross-entropy of the next tokens, or of the class (with its accuracy);
    `chunked` as in `summed_loss`, or through the fused output layer where the engine's model has one
    (lmscale.objectives.fused_head). A mixture-of-experts model's router load-balancing loss is always reported
    (`router_aux_loss`), and with `router_loss` added to the objective as HF adds it."""

    def objective(engine: Any, batch: Batch) -> LossParts:
        next_tokens = batch.labels_aligned or batch["labels"].dim() == 2
        if chunked and next_tokens and has_fused_head(engine.module):
            outputs, summed = fused_model_loss(engine, batch)
            parts = LossParts(summed, batch.local_targets)
            add_router_loss(parts, outputs, engine, router_loss, batch)
            return parts
        outputs, labels = model_outputs(engine, batch)
        logits, sums = outputs.logits, {}
        if batch.labels_aligned:  # a sequence-parallel slice: targets already aligned with the logits
            summed = aligned_token_loss(logits, labels, label_smoothing, chunked)
        else:
            summed = summed_loss(logits, labels, label_smoothing, chunked)
            if labels.dim() == 1:  # ignored (filler) rows never match -100
                sums["accuracy"] = (logits.argmax(dim=-1) == labels).sum()
        parts = LossParts(summed, batch.local_targets, sums)
        add_router_loss(parts, outputs, engine, router_loss, batch)
        return parts

    return objective


def add_router_loss(parts: LossParts, outputs: Any, engine: Any, train: bool, batch: Batch) -> None:
    """A mixture-of-experts model's load-balancing loss (HF's `aux_loss`, a mean over the micro-batch's
    tokens; over its whole rows for a sequence-parallel slice), weighted by the micro-batch's targets: divided
    by the step's targets as the summed loss is, it enters the step's mean as HF adds it to its mean loss,
    `router_aux_loss_coef` x aux_loss."""
    parts.expert_tokens = routed_tokens(engine.module)
    aux = getattr(outputs, "aux_loss", None)
    if aux is None:
        return
    if batch.labels_aligned:  # a slice of each row: HF's loss is the slice's (lmscale.objectives.balancing)
        top_k = engine.module.config.num_experts_per_tok
        aux = sliced_balancing_loss(outputs.router_logits, top_k, batch["token_mask"], sequence_group())
    parts.sums["router_aux_loss"] = aux.detach() * parts.targets
    coefficient = getattr(engine.module.config, "router_aux_loss_coef", 0.0)
    if train and coefficient:
        parts.summed = parts.summed + coefficient * aux * parts.targets


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: an untrained model's exp(loss) can overflow
