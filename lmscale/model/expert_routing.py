"""Tokens per expert of a mixture-of-experts model, counted from each router's own choices.

Why from the routers and not from the router logits HF returns: a router's choice is not always the top-k of
its logits. DeepSeek-V3 adds a routing bias and keeps only the best expert groups before its top-k, and
DeepSpeed's AutoEP replaces the routers (for the DeepSeek families its layers record no logits at all). Each
router says what it chose: transformers 5's routers return (logits, weights, chosen experts), AutoEP's
(weights, chosen experts, tokens per expert); transformers 4's are linear layers whose logits' top-k is the
choice. Padding is routed like any token, so it counts (it costs the experts the same).

A forward hook per router records its layer's counts; the model's own forward starts a fresh record, so the
recompute of checkpointed blocks in backward (routers run again there) is not counted twice.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

_WATCHED: weakref.WeakKeyDictionary[torch.nn.Module, RoutingCounts] = weakref.WeakKeyDictionary()


class RoutingCounts:
    """The tokens each MoE layer's router sent to each expert in the model's latest forward."""

    def __init__(self, top_k: int | None) -> None:
        self.top_k = top_k
        self.layers: list[torch.Tensor] = []

    def clear(self, *_: Any) -> None:
        self.layers = []

    def recorder(self, router: torch.nn.Module) -> Callable[[torch.nn.Module, Any, Any], None]:
        """The forward hook for `router`, its output's form decided once here, not on every forward."""
        autoep = is_autoep_router(router)

        def record(_router: torch.nn.Module, _inputs: Any, output: Any) -> None:
            with torch.no_grad():
                self.layers.append(layer_counts(output, self.top_k, autoep).double())

        return record

    def take(self) -> torch.Tensor | None:
        """[layers, experts] of the latest forward (None when no router ran), and a fresh record."""
        layers, self.layers = self.layers, []
        return torch.stack(layers) if layers else None


def layer_counts(output: Any, top_k: int | None, autoep: bool) -> torch.Tensor:
    """Tokens per expert from one router's output (see the module's docstring for the three forms)."""
    if isinstance(output, torch.Tensor):  # transformers 4: the logits
        return chosen_counts(output.topk(top_k, dim=-1).indices, output.shape[-1])
    if autoep:
        return output[2]
    logits, chosen = output[0], output[2]
    return chosen_counts(chosen, logits.shape[-1])


def chosen_counts(chosen: torch.Tensor, experts: int) -> torch.Tensor:
    """How often each of `experts` appears in `chosen`, on its device. Not torch.bincount: on a GPU it reads the
    largest index back to the host, a synchronization per MoE layer and forward."""
    flat = chosen.flatten()
    return torch.zeros(experts, dtype=torch.float64, device=flat.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.float64)
    )


def is_autoep_router(module: torch.nn.Module) -> bool:
    try:
        from deepspeed.moe.ep_router import TokenChoiceTopKRouter
    except ImportError:  # a DeepSpeed without AutoEP
        return False
    return isinstance(module, TokenChoiceTopKRouter)


def routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Each MoE block's router, in forward order: the `router` (AutoEP's layers) or `gate` (HF's blocks)
    beside the block's `experts`."""
    found = []
    for module in model.modules():
        if not hasattr(module, "experts"):
            continue
        router = getattr(module, "router", None)
        router = router if router is not None else getattr(module, "gate", None)
        if isinstance(router, torch.nn.Module):
            found.append(router)
    return found


def watch_routing(model: torch.nn.Module) -> None:
    """Count each forward's routing from now on (after any layer swap, e.g. AutoEP's); a dense model, or one
    already watched, is left as it is."""
    found = routers(model)
    if not found or model in _WATCHED:
        return
    counts = RoutingCounts(getattr(getattr(model, "config", None), "num_experts_per_tok", None))
    model.register_forward_pre_hook(counts.clear)
    for router in found:
        router.register_forward_hook(counts.recorder(router))
    _WATCHED[model] = counts


def routed_tokens(model: torch.nn.Module) -> torch.Tensor | None:
    """How many tokens each MoE layer's router sent to each expert in `model`'s latest forward ([layers,
    experts], float64), or None for a model not watched."""
    counts = _WATCHED.get(model)
    return counts.take() if counts is not None else None
