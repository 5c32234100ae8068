"""A mixture-of-experts router's load-balancing loss over whole rows when each rank holds a slice of them.

The loss (Switch Transformer's, as transformers' Mixtral and Qwen-MoE families compute it in
`load_balancing_loss_func`) is the number of experts times the sum over experts of two means over the real
tokens of every MoE layer: the share of top-k choices that went to the expert, and the router's mean
probability for it. Under sequence parallelism a rank's forward sees a slice of each row, and a product of two
means over a slice is not the product over the row: every slice's loss differs from one process's. Here the
three sums behind the means (choices, probabilities, real tokens) are added over the sequence group before
the product, so every rank gets one process's loss, and torch.distributed.nn's all-reduce carries its gradient
back to every slice's router. Written by hand because transformers reduces over one process's tokens only;
its formula is followed term by term (tests/objectives/test_balancing.py holds the two equal).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as distributed_autograd


def sliced_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], top_k: int, token_mask: torch.Tensor, group: Any
) -> torch.Tensor:
    """The load-balancing loss of the whole rows whose slices the ranks of `group` hold: `router_logits` are
    this rank's MoE layers' [tokens, experts] logits, `token_mask` its slice's real tokens."""
    experts = router_logits[0].shape[-1]
    device = router_logits[0].device
    mask = token_mask.reshape(-1).to(device, torch.float32)
    choices = torch.zeros(experts, dtype=torch.float32, device=device)
    probabilities = torch.zeros(experts, dtype=torch.float32, device=device)
    for logits in router_logits:
        weights = torch.nn.functional.softmax(logits, dim=-1)
        chosen = torch.topk(weights, top_k, dim=-1).indices
        choices = choices.scatter_add(0, chosen.reshape(-1), mask.repeat_interleave(top_k))
        probabilities = probabilities + (weights.float() * mask.unsqueeze(-1)).sum(dim=0)
    counts = torch.cat([choices, mask.sum().reshape(1) * len(router_logits)])
    dist.all_reduce(counts, group=group)  # no gradient: which experts were chosen, how many tokens
    probabilities = distributed_autograd.all_reduce(probabilities, group=group)
    choices, tokens = counts[:-1], counts[-1]
    return torch.sum((choices / tokens) * (probabilities / tokens)) * experts
