"""The end-of-run check that every data-parallel replica holds the same weights."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist

from lmscale.errors import LmscaleError
from lmscale.parallel.layout import Layout


def parameter_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in name order."""
    digest = hashlib.sha256()
    for name, param in sorted(module.named_parameters()):
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
    dist.all_gather_object(digests, parameter_digest(engine.module))
    for slice_index in range(layout.tensor):
        replicas = {d for rank, d in enumerate(digests) if layout.tensor_rank(rank) == slice_index}
        if len(replicas) > 1:
            raise LmscaleError(
                f"the {layout.data} data-parallel replicas ended with different parameters "
                f"({sorted(replicas)[0][:12]}...): they diverged; check the network between nodes and rerun "
                "from the last checkpoint"
            )
    return digests[0]
