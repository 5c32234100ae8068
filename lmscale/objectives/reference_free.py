"""Preference optimisation without a reference model, on the same pairs as DPO (chosen rows first, then
rejected): ORPO and SimPO. Both score a reply by its mean log-probability per target token; the formulas
follow TRL's ORPOTrainer and CPOTrainer(loss_type="simpo"), and a parity test checks them against TRL.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lmscale.config import OrpoConfig, SimpoConfig
from lmscale.data.batches import IGNORE_INDEX, Batch
from lmscale.objectives.dpo import PairScores, preference_figures, sequence_logps
from lmscale.objectives.loss import LossParts, Objective, model_outputs


def mean_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: the mean log-probability of its targets (fp32)."""
    summed, targets = sequence_logps(logits, labels)
    return summed / targets.clamp(min=1)


def pair_mean_logps(engine: Any, batch: Batch) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """(the model's outputs, chosen replies' mean log-probabilities, rejected replies') of a pair batch."""
    outputs, labels = model_outputs(engine, batch)
    pairs = batch.pairs
    logps = mean_logps(outputs.logits[: 2 * pairs], labels[: 2 * pairs])
    return outputs, logps[:pairs], logps[pairs:]


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2 (where one form or the other cancels)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio_terms(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log sigmoid of the log odds ratio, the log odds ratio) per pair, from mean log-probabilities."""
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return F.logsigmoid(log_odds), log_odds


def whole_sequence_nll(logits: torch.Tensor, batch: Batch, rows: int) -> tuple[torch.Tensor, int]:
    """(summed next-token cross-entropy, tokens) over the first `rows` rows, prompt included: ORPO's
    supervised term, as TRL computes it (over the full prompt and reply, padding excluded)."""
    inputs = batch["input_ids"][:rows].to(logits.device)
    mask = batch["attention_mask"][:rows].to(logits.device)
    labels = inputs.masked_fill(mask == 0, IGNORE_INDEX)[:, 1:]
    shifted = logits[:rows, :-1].float()
    nll = F.cross_entropy(
        shifted.reshape(-1, shifted.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll, int((labels != IGNORE_INDEX).sum())


def orpo_objective(settings: OrpoConfig) -> Objective:
    """ORPO, summed over the batch's pairs: each pair carries the batch's mean chosen-sequence cross-entropy
    (so that the mean over pairs is TRL's token mean) less lambda x log sigmoid(log odds ratio)."""

    def objective(engine: Any, batch: Batch) -> LossParts:
        outputs, chosen, rejected = pair_mean_logps(engine, batch)
        pairs = batch.pairs
        ratio, log_odds = odds_ratio_terms(chosen, rejected)
        nll_sum, tokens = whole_sequence_nll(outputs.logits, batch, pairs)
        nll_mean = nll_sum / max(tokens, 1)
        # a filler batch (pairs == 0) still sums to a 0 joined to the graph: its backward keeps ZeRO in step
        summed = pairs * nll_mean - settings.beta * ratio.sum()
        scores = PairScores(
            -settings.beta * ratio, settings.beta * chosen.detach(), settings.beta * rejected.detach()
        )
        figures = preference_figures(scores) | {
            "nll_loss": pairs * nll_mean.detach(),
            "log_odds_ratio": ratio.detach().sum(),
            "log_odds_chosen": log_odds.detach().sum(),
        }
        return LossParts(summed, pairs, figures)

    return objective


def simpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, settings: SimpoConfig) -> torch.Tensor:
    """-log sigmoid(beta x (mean log-probability margin) - gamma), per pair."""
    return -F.logsigmoid(settings.beta * (chosen - rejected) - settings.gamma)


def simpo_objective(settings: SimpoConfig) -> Objective:
    """SimPO, summed over the batch's pairs; rewards are beta x the mean log-probabilities."""

    def objective(engine: Any, batch: Batch) -> LossParts:
        _, chosen, rejected = pair_mean_logps(engine, batch)
        losses = simpo_loss(chosen, rejected, settings)
        summed = losses.sum()  # over no pairs (a filler batch) still a 0 joined to the graph, as for DPO
        scores = PairScores(losses, settings.beta * chosen.detach(), settings.beta * rejected.detach())
        return LossParts(summed, batch.pairs, preference_figures(scores))

    return objective
