"""The output layer fused into the next-token loss (`train.chunked_loss` on the families that allow it).

At long context the logits dominate memory: [tokens, vocab] in the compute dtype, their gradient, and the
loss's fp32 copy. The blockwise cross-entropy (`loss.aligned_token_loss(chunked=True)`) removes the fp32
copy only. Fusing the output layer into the loss removes the logits themselves: DeepSpeed's
`vocab_parallel_linear_cross_entropy` computes `hidden @ W.T` a block of tokens at a time, keeps one
log-sum-exp per token, and recomputes each block in backward.

The model's own forward still runs (through the engine, so ZeRO-3 gathers the output weight, AutoTP and
Ulysses see their layers and `model.compile` compiles it): the output layer's forward is replaced on the
instance by one that, while targets are set, returns the summed loss in place of the logits. That is only
right where the model hands the output layer's result back unchanged, so it is offered for the families
listed in `FUSABLE_FAMILIES` (checked in their HF forward: no soft-capping or scaling of the logits), and
the loss is checked to come back as the scalar it is.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

# HF families whose causal-LM forward returns `lm_head(hidden_states)` as the logits, untransformed
# (gemma 2/3 soft-cap them, cohere and granite scale them: those keep the blockwise loss).
FUSABLE_FAMILIES = frozenset(
    {
        "gpt2",
        "gpt_neox",
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "phi3",
        "olmo2",
    }
)
TARGETS = "_lmscale_loss_targets"  # attribute of the output layer while a fused forward runs


def fused_head_problem(model: torch.nn.Module) -> str | None:
    """Why the output layer of `model` cannot be fused into the loss, or None when it can."""
    family = getattr(model.config, "model_type", "?")
    if family not in FUSABLE_FAMILIES:
        return f"{family} models may transform their logits after the output layer"
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"its output layer is a {type(head).__name__}, not a plain linear layer"
    return None


def _fused_forward(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """The output layer's forward: the logits, or with targets set, their summed cross-entropy."""
    targets = getattr(head, TARGETS, None)
    if targets is None:
        return F.linear(hidden, head.weight, head.bias)
    from deepspeed.sequence.linear_cross_entropy import vocab_parallel_linear_cross_entropy

    # imported here: lmscale.data loads `datasets`, which `lmscale plan` (it imports this module) never needs
    from lmscale.data.batches import IGNORE_INDEX

    return vocab_parallel_linear_cross_entropy(
        hidden, head.weight, targets, bias=head.bias, ignore_index=IGNORE_INDEX, reduction="sum"
    )


def install_fused_head(model: torch.nn.Module) -> None:
    """Replace the forward of `model`'s output layer (after `deepspeed.initialize`, which may swap layers)."""
    head = model.get_output_embeddings()
    head.forward = types.MethodType(_fused_forward, head)
    setattr(head, TARGETS, None)


def has_fused_head(model: torch.nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and hasattr(head, TARGETS)


@contextmanager
def loss_targets(model: torch.nn.Module, targets: torch.Tensor) -> Iterator[None]:
    """While inside, the fused output layer returns the summed loss against `targets` (aligned with the
    positions: `targets[i]` is the target of position i)."""
    head = model.get_output_embeddings()
    setattr(head, TARGETS, targets)
    try:
        yield
    finally:
        setattr(head, TARGETS, None)


def summed_fused_loss(outputs: Any) -> torch.Tensor:
    """The summed loss a fused forward returned in place of the logits."""
    loss = outputs.logits
    if loss.dim() != 0:  # the model did something to the logits that the family list did not expect
        raise RuntimeError(
            f"the fused output layer's loss came back with shape {tuple(loss.shape)}: this model changes "
            "its logits after the output layer; set train.chunked_loss=false"
        )
    return loss
