"""Kahneman-Tversky optimisation on unpaired records (lmscale.data.unpaired): each completion, desirable or
not, is judged alone against a reference point, the policy's KL divergence from the starting model.

With r = log pi(y|x) - log pi_ref(y|x) summed over the completion's tokens and z the batch's KL estimate
(the mean of the same log-ratio over the mismatched KL sequences, clamped at 0 and not differentiated),
a desirable completion costs desirable_weight x (1 - sigmoid(beta (r - z))) and an undesirable one
undesirable_weight x (1 - sigmoid(beta (z - r))); the loss is their mean over records. The formula and the
logged rewards follow TRL's KTOTrainer (a parity test checks them against it). The reference's
log-probabilities of both rows come from the reference pass before training, as for DPO.

Unlike TRL, which runs the KL sequences through the policy with gradients on and then detaches the result,
the KL rows here go through a forward pass without gradients: no activations are kept for them and the
backward pass does not run over them, which saves about a third of a step's compute.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from lmscale.config import KtoConfig
from lmscale.data.batches import REFERENCE_COLUMNS, Batch
from lmscale.objectives.dpo import sequence_logps
from lmscale.objectives.loss import LossParts, Objective, forward, per_count

REFERENCE = REFERENCE_COLUMNS["kl_ids"]  # the batch's reference columns: the completion's, the KL sequence's


def rows_of(batch: Batch, rows: slice) -> Batch:
    """The batch cut to some of its rows (the per-row tensors only; per-record values stay behind). A filler
    batch (no records) keeps its one padding row, so every rank still runs both forward passes. The rows keep
    the batch's width, the one the reference pass scored them at: a narrower one changes the rounding (bf16),
    and the policy would no longer equal the reference exactly at step 0. Each record's KL sequence borrows a
    completion of about its own length (lmscale.data.unpaired), so the shared width wastes little."""
    if batch.pairs == 0:
        rows = slice(0, 1)
    return replace(batch, tensors={k: v[rows] for k, v in batch.tensors.items() if v.dim() == 2})


def kl_estimate(log_ratios: torch.Tensor) -> torch.Tensor:
    """The mean log-ratio over every rank's KL sequences of this micro-batch, clamped at 0 (TRL averages the
    ranks' means; this weighs each sequence alike, the same when the ranks hold as many)."""
    count = log_ratios.new_tensor(float(log_ratios.numel()), dtype=torch.float64)  # on the same device
    totals = torch.stack([log_ratios.sum().double(), count])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    return (totals[0] / totals[1].clamp(min=1)).clamp(min=0).float()


@dataclass
class KtoScores:
    losses: torch.Tensor  # one per record, weighted
    rewards: torch.Tensor  # beta x log-ratio to the reference, no gradient
    desirable: torch.Tensor  # bool per record


def kto_scores(
    logps: torch.Tensor,
    reference: torch.Tensor,
    kl: torch.Tensor,
    desirable: torch.Tensor,
    settings: KtoConfig,
) -> KtoScores:
    """KTO's weighted losses and rewards of the records, from their completions' summed log-probabilities."""
    ratios = logps - reference
    beta = settings.beta
    desirable_losses = settings.desirable_weight * (1 - torch.sigmoid(beta * (ratios - kl)))
    undesirable_losses = settings.undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratios)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return KtoScores(losses, beta * ratios.detach(), desirable)


def kto_figures(scores: KtoScores, kl: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums of what is logged as means: the rewards of desirable and of undesirable records each over their
    own count (TRL's rewards/chosen and rewards/rejected), the KL estimate, and the share of records whose
    reward has their label's sign (a tie, as before training, counts half)."""
    rewards, desirable = scores.rewards, scores.desirable
    right = torch.where(desirable, rewards > 0, rewards < 0).double() + 0.5 * (rewards == 0).double()
    figures = {"kl": kl.detach().double() * rewards.numel(), "label_accuracy": right.sum()}
    figures |= per_count("rewards_chosen", rewards[desirable])
    figures |= per_count("rewards_rejected", rewards[~desirable])
    return figures


def kto_objective(settings: KtoConfig) -> Objective:
    """The loop's objective for unpaired records: KTO's loss summed over the batch's records."""

    def objective(engine: Any, batch: Batch) -> LossParts:
        records = batch.pairs
        with torch.no_grad():  # the KL sequences only set the reference point
            kl_logits, kl_labels = forward(engine, rows_of(batch, slice(records, 2 * records)))
            kl_logps = sequence_logps(kl_logits, kl_labels)[0][:records]
            del kl_logits
        logits, labels = forward(engine, rows_of(batch, slice(0, records)))
        logps = sequence_logps(logits, labels)[0][:records]
        reference, kl_reference = (batch[name].to(logps.device) for name in REFERENCE) if records else (0, 0)
        kl = kl_estimate(kl_logps - kl_reference)
        desirable = batch["desirable"].to(logps.device).bool() if records else logps.new_zeros(0, dtype=bool)
        # a filler batch (no records) still sums to a 0 joined to the graph: its backward keeps ZeRO in step
        scores = kto_scores(logps, reference, kl, desirable, settings)
        return LossParts(scores.losses.sum(), records, kto_figures(scores, kl))

    return objective
