"""GRPO's held-out figure: the mean reward of greedy answers to held-out prompts (eval_reward), over all
ranks. Every rank answers as many prompts (the last ranks repeat some, weighted 0), in one `generate` call,
so ZeRO-3's per-block gathers stay matched across ranks."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.distributed as dist

from lmscale.rollouts.generation import sample
from lmscale.rollouts.scoring import RewardSet, score, total_reward
from lmscale.rollouts.stream import Prompts, RolloutSettings


def rank_share(count: int, rank: int, ranks: int) -> tuple[list[int], list[float]]:
    """(indices, weights) of this rank's held-out prompts: ceil(count / ranks) each, repeats weighted 0."""
    share = math.ceil(count / ranks)
    positions = range(rank * share, (rank + 1) * share)
    return [p % count for p in positions], [float(p < count) for p in positions]


def held_out_reward(
    model: torch.nn.Module,
    device: torch.device,
    prompts: Prompts,
    settings: RolloutSettings,
    rewards: RewardSet,
    end_ids: set[int],
) -> tuple[float, dict[str, float]]:
    """(the loss the loop ranks checkpoints by: minus the mean reward, the figures: reward, reward per
    function, completion length, prompts answered) of `model` (the engine's module, or a loaded model)."""
    count = min(settings.grpo.eval_prompts, len(prompts))
    indices, weights = rank_share(count, settings.data_rank, settings.data_ranks)
    prompt_ids, shown, fields = prompts.take(indices)
    sampling = replace(settings.sampling(), greedy=True)
    completions = sample(
        model, device, prompt_ids, sampling, 0, prompts.tokenizer.pad_token_id, end_ids, settings.synced
    )
    per_function = score(rewards, shown, prompts.as_completions(completions.ids), fields, completions.ids)
    weight = torch.tensor(weights, dtype=torch.float64)
    total = total_reward(per_function, rewards.weights)
    judged = ~torch.isnan(per_function)
    lengths = torch.tensor([len(c) for c in completions.ids], dtype=torch.float64)
    sums = torch.cat(
        [
            torch.stack([(total * weight).sum(), weight.sum(), (lengths * weight).sum()]),
            (torch.nan_to_num(per_function) * weight[:, None]).sum(dim=0),
            (judged * weight[:, None]).sum(dim=0),
        ]
    )
    if dist.is_available() and dist.is_initialized():
        sums = sums.to(device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    reward, records, length = float(sums[0]), float(sums[1]), float(sums[2])
    functions = len(rewards.functions)
    means = {"reward": reward / records, "completion_length": length / records, "prompts": records}
    for column, name in enumerate(rewards.names()):
        judged_count = float(sums[3 + functions + column])
        if judged_count:
            means[f"reward/{name}"] = float(sums[3 + column]) / judged_count
    return -means["reward"], means
