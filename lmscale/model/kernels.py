"""Fused kernels: swap transformers' Python-composed activations for PyTorch's one-kernel equivalents.

GPT-2, GPT-J, GPT-Neo, CodeGen and Phi use `gelu_new` (or `gelu_fast` / `gelu_accurate`): the tanh
approximation of GELU written as about eight elementwise tensor ops, each a full pass over the MLP's
activations, forward and again in backward. `torch.nn.functional.gelu(approximate="tanh")` is the
same function in one kernel (transformers' own `gelu_pytorch_tanh`); outputs differ at rounding level
only. On a tiny GPT-2 on CPU it makes forward+backward about 1.17x faster (bench/README.md).

Only activations are swapped: they hold no parameters, so state dicts, checkpoints, exports and the
saved config are unchanged. Norms are left alone: `F.rms_norm` measured no faster than HF's RMSNorm on
CPU, and some families' norms differ in form (Gemma's scales by 1 + weight).
"""

from __future__ import annotations

import torch
from transformers.activations import ACT2CLS

# transformers' names for the tanh-approximated GELU written out in Python ops.
TANH_GELU_NAMES = ("gelu_new", "gelu_fast", "gelu_accurate")
FUSED_TANH_GELU = ACT2CLS["gelu_pytorch_tanh"]  # GELUTanh (PytorchGELUTanh in older transformers)


def _composed_tanh_gelu_classes() -> tuple[type, ...]:
    return tuple(ACT2CLS[name] for name in TANH_GELU_NAMES if isinstance(ACT2CLS.get(name), type))


def fuse_activations(model: torch.nn.Module) -> int:
    """Replace every Python-composed tanh-GELU module with the fused one, in place; returns how many."""
    composed = _composed_tanh_gelu_classes()
    swaps = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) in composed
    ]
    for parent, name in swaps:
        setattr(parent, name, FUSED_TANH_GELU())
    return len(swaps)


def describe_fused(model: torch.nn.Module) -> str:
    """For the start-up line: how many activations run the fused tanh-GELU kernel."""
    count = sum(isinstance(module, FUSED_TANH_GELU) for module in model.modules())
    return f"{count} fused tanh-GELU activation(s)" if count else "no fused activations"
