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
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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
        self._counting = True
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

    @contextmanager
    def apart(self) -> Iterator[None]:
        """What is made inside is not the device's (host memory, when a CPU stands in for a GPU)."""
        self._counting = False
        try:
            yield
        finally:
            self._counting = True

    def _count(self, tensor: torch.Tensor) -> None:
        if not self._counting:
            return
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


@contextmanager
def offload_as_on_a_gpu(live: LiveBytes) -> Iterator[None]:
    """Activation offload measured on a CPU as a GPU runs it. torch's `save_on_cpu` keeps a CPU tensor as it is
    (its host memory is the memory it was in), so offload would save nothing here; on a GPU it copies each saved
    tensor to host memory, which the device's count leaves out, and backward gets a new device copy. This makes
    `save_on_cpu` (what `lmscale.model.build.offloaded_checkpoint` calls) do the same copies, the host's apart."""

    def to_host(tensor: torch.Tensor) -> torch.Tensor:
        with live.apart():
            return tensor.clone()

    class SaveOnHost(torch.autograd.graph.saved_tensors_hooks):
        def __init__(self, pin_memory: bool = False) -> None:
            super().__init__(to_host, torch.clone)  # back on the device: a new, counted copy

    graph = torch.autograd.graph
    save_on_cpu, graph.save_on_cpu = graph.save_on_cpu, SaveOnHost
    try:
        yield
    finally:
        graph.save_on_cpu = save_on_cpu


def step_peak(model: torch.nn.Module, ids: list[int], fused_loss: bool) -> int:
    """The peak bytes of the live tensors of a `training_step` of `model` on `ids`, taken after a first step
    has made the gradients (as DeepSpeed's exist), with activation offload counted as on a GPU."""
    step = training_step(model, ids, fused_loss)
    step()
    with LiveBytes(model) as live, offload_as_on_a_gpu(live):
        step()
    return live.peak


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
