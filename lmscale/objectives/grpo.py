"""GRPO's objective: group-normalised
advantages of sampled completions, and the clipped surrogate on per-token log-probabilities, with the
`grpo`, `dr_grpo` and `dapo` aggregations and an optional KL term to the reference. The formulas follow
TRL 1.16's GRPOTrainer (`_generate_and_score_completions` for the advantages, `_compute_loss` for the loss);
a parity test checks them against it.

In lmscale's convention a loss is a sum over its targets, divided by the step's targets afterwards: `dapo`
sums token losses (targets: completion tokens, TRL's `num_items_in_batch`), `grpo` sums each completion's
mean token loss and `dr_grpo` each completion's token losses over `max_completion_length` (targets:
completions), so the step's mean is TRL's however completions fall into micro-batches and ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from lmscale.data.batches import Batch
from lmscale.objectives.loss import COUNT, LossParts, Objective, forward, token_logps

if TYPE_CHECKING:
    from lmscale.config import GrpoConfig

ScaleRewards = Literal["group", "batch", "none"]
LossType = Literal["grpo", "dr_grpo", "dapo"]


def group_advantages(rewards: torch.Tensor, group_size: int, scale: ScaleRewards = "group") -> torch.Tensor:
    """Each completion's reward less its group's mean (the `group_size` completions of one prompt, adjacent),
    divided by the group's standard deviation (`group`), the whole batch's (`batch`) or not at all (`none`);
    +1e-4 keeps a group whose completions all scored alike at advantage 0."""
    groups = rewards.view(-1, group_size)
    centred = (groups - groups.mean(dim=1, keepdim=True)).view(-1)
    if scale == "none":
        return centred
    spread = (
        groups.std(dim=1).repeat_interleave(group_size)
        if scale == "group"
        else rewards.std().expand_as(rewards)
    )
    return centred / (spread + 1e-4)


@dataclass(frozen=True)
class GrpoLoss:
    loss_type: LossType = "dapo"
    epsilon: float = 0.2  # the ratio is clipped to [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # None: epsilon (DAPO recommends 0.28)
    beta: float = 0.0  # weight of the KL term to the reference; 0: no reference is needed
    # The KL term times the importance ratio (TRL's default, use_bias_correction_kl): its gradient is then the
    # unbiased reverse-KL gradient for completions sampled by an older policy (DeepSeek-V3.2).
    bias_correction_kl: bool = True
    max_completion_length: int = 256  # dr_grpo's constant normaliser


@dataclass
class GrpoParts:
    summed: torch.Tensor  # the loss summed over the targets
    targets: int  # completion tokens (dapo) or completions (grpo, dr_grpo)
    sums: dict[str, torch.Tensor]  # figure sums: clipped tokens (low, high) and the KL, over tokens


def token_losses(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    settings: GrpoLoss,
    reference_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """[completions, tokens] losses of the clipped surrogate (plus beta x the k3 KL estimate to the
    reference), and the per-token figures: which ratios were clipped below and above, and the KL."""
    ratio = torch.exp(logps - old_logps)
    high = settings.epsilon_high if settings.epsilon_high is not None else settings.epsilon
    clipped = torch.clamp(ratio, 1 - settings.epsilon, 1 + high)
    advantage = advantages.unsqueeze(1)
    losses = -torch.min(ratio * advantage, clipped * advantage)
    figures = {
        "clip_low": ((ratio < 1 - settings.epsilon) & (advantage < 0)).float(),
        "clip_high": ((ratio > 1 + high) & (advantage > 0)).float(),
    }
    if settings.beta:
        if reference_logps is None:
            raise ValueError("GRPO's KL term (beta > 0) needs the reference's per-token log-probabilities")
        gap = reference_logps - logps
        kl = torch.exp(gap) - gap - 1
        if settings.bias_correction_kl:
            kl = kl * ratio
        losses = losses + settings.beta * kl
        figures["kl"] = kl.detach()
    return losses, figures


def grpo_parts(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    settings: GrpoLoss,
    reference_logps: torch.Tensor | None = None,
) -> GrpoParts:
    """The loss of a micro-batch of completions ([completions, tokens] log-probabilities of their tokens
    under the policy now and when they were sampled; `mask` marks real completion tokens), as a sum."""
    losses, figures = token_losses(logps, old_logps, advantages, settings, reference_logps)
    mask = mask.to(losses.dtype)
    tokens = mask.sum(dim=1)
    if settings.loss_type == "dapo":
        summed, targets = (losses * mask).sum(), int(tokens.sum())
    elif settings.loss_type == "grpo":
        summed, targets = ((losses * mask).sum(dim=1) / tokens.clamp(min=1)).sum(), logps.size(0)
    else:  # dr_grpo
        summed, targets = (losses * mask).sum() / settings.max_completion_length, logps.size(0)
    sums = {name: (value * mask).sum().detach() for name, value in figures.items()}
    return GrpoParts(summed, targets, sums)


def grpo_settings(config: GrpoConfig) -> GrpoLoss:
    return GrpoLoss(
        loss_type=config.loss_type,
        epsilon=config.epsilon,
        epsilon_high=config.epsilon_high,
        beta=config.beta,
        max_completion_length=config.max_new_tokens,
    )


def grpo_objective(config: GrpoConfig) -> Objective:
    """The loss of a micro-batch of sampled completions (lmscale.rollouts builds them: `advantages` per row,
    `old_logps` when num_iterations > 1, `reference_logps` when beta > 0). Clipping and KL figures are means
    over completion tokens, whatever the loss's targets are."""
    settings = grpo_settings(config)

    def objective(engine: Any, batch: Batch) -> LossParts:
        logits, labels = forward(engine, batch)
        logps, mask = token_logps(logits, labels)
        device = logps.device
        # One update per batch of completions: the sampling policy is this one, so the ratio is exactly 1
        # (TRL does the same); its gradient is still the policy gradient.
        old = batch["old_logps"].to(device) if "old_logps" in batch else logps.detach()
        reference = batch["reference_logps"].to(device) if "reference_logps" in batch else None
        advantages = batch["advantages"].to(device)
        parts = grpo_parts(logps, old, advantages, mask, settings, reference)
        tokens = mask.sum().to(torch.float64)
        sums = {}
        for name, total in parts.sums.items():
            sums[name], sums[name + COUNT] = total, tokens
        return LossParts(parts.summed, parts.targets, sums)

    return objective
