"""model.tiled_mlp: each block's MLP computed a slice of the sequence at a time, for long contexts.

The MLP's intermediate activations (tokens x intermediate size, several copies) dominate a block's memory
at 32k+ tokens; DeepSpeed's `TiledMLP` (deepspeed.runtime.sequence_parallel.ulysses_sp) runs the MLP on one
slice at a time without keeping them, and recomputes each slice in backward. lmscale installs it on every
block's MLP module (the instance, not the class) and agrees the slice count across ranks.

Why the agreement: under ZeRO-3 every call of the MLP gathers its weights in a collective, so every rank
must call it the same number of times, and `torch.chunk` gives fewer slices than asked when the rows do not
divide well (10 rows in 6 slices are 5 slices of 2). Before each forward pass the ranks exchange their
sequence lengths (one small all-gather) and take the largest slice count that every rank's
rows split into exactly: DeepSpeed's example agrees only on the count it asks for, which can still deadlock.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lmscale.errors import ConfigError


def exact_slices(rows: int, wanted: int) -> bool:
    """Whether torch.chunk splits `rows` into exactly `wanted` slices."""
    return rows >= wanted and math.ceil(rows / math.ceil(rows / wanted)) == wanted


def agreed_slices(shapes: list[tuple[int, int]], tokens_per_slice: int) -> int:
    """The slice count for every rank's (batch, sequence) shape: about one slice per `tokens_per_slice` of the
    longest sequence (by default the hidden size, DeepSpeed's choice: a slice's activations then weigh about
    what one projection's weights do), lowered until each rank's sequence (forward) and batch x sequence rows
    (backward) split into exactly that many."""
    wanted = max(1, max(math.ceil(seq / tokens_per_slice) for _, seq in shapes))
    while wanted > 1 and not all(
        exact_slices(seq, wanted) and exact_slices(batch * seq, wanted) for batch, seq in shapes
    ):
        wanted -= 1
    return wanted


class SliceAgreement:
    """The slice count of the current forward pass, shared by every tiled MLP of the model."""

    def __init__(self, tokens_per_slice: int) -> None:
        self.tokens_per_slice = tokens_per_slice
        self.slices = 1

    def before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = args[0] if args else kwargs.get("inputs_embeds")
        shape = (int(tokens.shape[0]), int(tokens.shape[1]))
        self.slices = agreed_slices(all_ranks_shapes(shape), self.tokens_per_slice)


def all_ranks_shapes(shape: tuple[int, int]) -> list[tuple[int, int]]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [shape]
    # On the default group (NCCL wants device tensors): one tiny all-gather per forward pass, where DeepSpeed's
    # own example all-reduces once per MLP call.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    gathered = [torch.zeros(2, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, torch.tensor(shape, dtype=torch.int64, device=device))
    return [(int(g[0]), int(g[1])) for g in gathered]


def block_mlps(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Each decoder block's dense MLP (`block.mlp`: Llama, Mistral, Qwen, GPT-2 and most families)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [
        block.mlp
        for block in model.modules()
        if isinstance(block, GradientCheckpointingLayer)
        and isinstance(getattr(block, "mlp", None), torch.nn.Module)
    ]


def check_tileable(mlps: list[torch.nn.Module]) -> None:
    if not mlps:
        raise ConfigError(
            "model.tiled_mlp: this model's blocks have no `mlp` module to tile: unset model.tiled_mlp"
        )
    for mlp in mlps:
        if hasattr(mlp, "experts") or hasattr(mlp, "gate") and not hasattr(mlp, "gate_proj"):
            raise ConfigError(
                "model.tiled_mlp tiles dense MLPs, not mixture-of-experts layers: unset model.tiled_mlp"
            )
        dropout = [m.p for m in mlp.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        if dropout:
            # Each slice is computed again in backward, where dropout would draw another mask.
            raise ConfigError(
                f"model.tiled_mlp recomputes each MLP in backward, where its dropout (p={dropout[0]}) would draw "
                "another mask: set model.residual_dropout=0"
            )


def tile_mlps(model: torch.nn.Module, tokens_per_slice: int) -> int:
    """Install TiledMLP on every block's MLP; returns how many."""
    mlps = block_mlps(model)
    check_tileable(mlps)
    agreement = SliceAgreement(tokens_per_slice)
    model.register_forward_pre_hook(agreement.before_forward, with_kwargs=True)
    for mlp in mlps:
        mlp.forward = tiled_forward(mlp, agreement)
    return len(mlps)


def tiled_forward(mlp: torch.nn.Module, agreement: SliceAgreement):
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    plain = type(mlp).forward  # the family's own MLP, called on one slice at a time
    params = list(mlp.parameters())  # ZeRO-3: their gradients are complete after the last slice

    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        def on_slice(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
            return plain(module, x, *args, **kwargs)

        return TiledMLP.apply(on_slice, mlp, hidden_states, agreement.slices, params)

    return forward
