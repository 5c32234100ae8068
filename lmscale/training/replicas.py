"""The end-of-run check that every data-parallel replica holds the same weights."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from lmscale.errors import LmscaleError
from lmscale.parallel.autoep import is_expert_parameter
from lmscale.parallel.layout import Layout


def parameter_digest(module: torch.nn.Module, experts: bool | None = None) -> str:
    """SHA-256 of the bytes of every parameter, in name order; with `experts` True or False, of AutoEP's
    expert parameters alone or of all the others (an expert lives on one rank of each expert group)."""
    digest = hashlib.sha256()
    for name, param in sorted(module.named_parameters()):
        if experts is not None and is_expert_parameter(param) != experts:
            continue
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_replicas_agree(engine: Any, zero_stage: int, layout: Layout) -> str | None:
    """Data-parallel replicas must end with the same weights (ZeRO 0-2 keep a full copy on every rank;
    with tensor parallelism, the ranks holding the same slice).

    Compared once at the end of a run: a difference means the ranks trained different models (a
    broken network, a non-deterministic collective), which no loss curve would show. Returns the
    digest of rank 0's weights.
    """
    if layout.data == 1 or zero_stage == 3:
        return None
    digests: list[str | None] = [None] * layout.world_size
    split = layout.expert > 1
    dist.all_gather_object(digests, parameter_digest(engine.module, experts=False if split else None))
    for slice_index in range(layout.tensor):
        same_slice(digests, lambda rank, s=slice_index: layout.tensor_rank(rank) == s, layout.data)
    copies = layout.expert_copies
    if split and copies > 1:  # experts have replicas only then
        expert_digests: list[str | None] = [None] * layout.world_size
        dist.all_gather_object(expert_digests, parameter_digest(engine.module, experts=True))
        for share in range(layout.expert):
            same_slice(
                expert_digests, lambda rank, s=share: layout.expert_rank(rank) == s, copies, "experts' "
            )
    return digests[0]


def same_slice(digests: list, holds_it: Callable[[int], bool], replicas: int, what: str = "") -> None:
    """The digests of the ranks that hold one slice of the weights must agree."""
    found = {d for rank, d in enumerate(digests) if holds_it(rank)}
    if len(found) > 1:
        raise LmscaleError(
            f"the {replicas} data-parallel replicas ended with different {what}parameters "
            f"({sorted(found)[0][:12]}...): they diverged; check the network between nodes and rerun "
            "from the last checkpoint"
        )
