"""Reward models: a scalar head on the last real token of each reply, trained on preference pairs with the
Bradley-Terry loss -log sigmoid(r_chosen - r_rejected), and optionally TRL's reward centering term. The
formula follows TRL's RewardTrainer; a parity test checks it against TRL."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lmscale.config import RewardConfig
from lmscale.data.batches import Batch
from lmscale.objectives.dpo import PairScores, preference_figures
from lmscale.objectives.loss import LossParts, Objective, model_inputs


def pair_rewards(engine: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen rewards, rejected rewards) of the batch's pairs, in fp32."""
    rewards = engine(**model_inputs(engine, batch)).logits.squeeze(-1).float()
    pairs = batch.pairs
    return rewards[:pairs], rewards[pairs : 2 * pairs]


def reward_objective(settings: RewardConfig) -> Objective:
    """The Bradley-Terry loss summed over the batch's pairs (plus centering, when set); the rewards logged
    are the head's outputs."""

    def objective(engine: Any, batch: Batch) -> LossParts:
        chosen, rejected = pair_rewards(engine, batch)
        margin = batch["margin"].to(chosen.device) if "margin" in batch else 0.0  # data.margin_field, as TRL
        losses = -F.logsigmoid(chosen - rejected - margin)
        if settings.center_coefficient:
            losses = losses + settings.center_coefficient * (chosen + rejected) ** 2
        # over no pairs (a filler batch) still a 0 joined to the graph, which keeps ZeRO's ranks in step
        scores = PairScores(losses, chosen.detach(), rejected.detach())
        return LossParts(losses.sum(), batch.pairs, preference_figures(scores))

    return objective
