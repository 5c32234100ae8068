"""Measure a step's activation memory on any device: the bytes of the tensors it creates that are alive at
once, at the end of forward (what backward will read) and at the peak.

This is what `torch.cuda.max_memory_allocated` shows on a GPU (less the allocator's rounding), measured at the
dispatcher instead, so a CPU can check the planner's activation figures (a CPU process's resident set also
holds the allocator's cached pages: bench/README.md). Written here because torch's own tracker
(`torch.distributed._tools.mem_tracker.MemTracker`) breaks inside DeepSpeed's TiledMLP: its module hooks ask
for a gradient function of the slices TiledMLP cuts under no_grad.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only


class LiveBytes(TorchDispatchMode):
    """Counts each new storage an operation returns while it lives (a weak reference notices its release);
    storages that existed before (weights, gradients, buffers of `modules`) are not the step's."""

    def __init__(self, *modules: torch.nn.Module) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: dict[int, weakref.ref] = {}
        self._existing = {
            tensor.untyped_storage().data_ptr()
            for module in modules
            for tensor in (*module.parameters(), *module.buffers(), *gradients(module))
        }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._count, out)
        self.peak = max(self.peak, self.live)
        return out

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        pointer, size = storage.data_ptr(), storage.nbytes()
        # a view or an in-place result shares a storage already counted (or one from before the step)
        if size == 0 or pointer in self._alive or pointer in self._existing:
            return
        self.live += size
        self._alive[pointer] = weakref.ref(storage, lambda _, p=pointer, n=size: self._release(p, n))

    def _release(self, pointer: int, size: int) -> None:
        if self._alive.pop(pointer, None) is not None:
            self.live -= size


def gradients(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in module.parameters() if p.grad is not None]


def training_step(model: torch.nn.Module, ids: list[int], fused_loss: bool) -> Callable[[], None]:
    """One forward and backward of `model` on one row of token `ids`, as lmscale's loop computes it (the
    fused output layer, `lmscale.objectives.fused_head`, when `fused_loss`): what the planner's activation
    figures are measured against."""
    from lmscale.data.batches import collate, sequence_slice
    from lmscale.objectives.fused_head import loss_targets
    from lmscale.objectives.loss import aligned_token_loss

    device = next(model.parameters()).device
    batch = {
        key: value.to(device) for key, value in sequence_slice(collate([ids], pad_id=0), 0, 0, 1).items()
    }
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}

    def step() -> None:
        if fused_loss:
            with loss_targets(model, batch["labels"]):
                summed = model(**inputs).logits  # the fused output layer returns the summed loss
        else:
            summed = aligned_token_loss(model(**inputs).logits, batch["labels"])
        summed.backward()

    return step
