"""The optimizer over its parameter groups (weight-decay exemptions, layer-wise LR decay).

Library optimizers throughout (lmscale.training.optimizers): torch's AdamW and SGD, DeepSpeed's fused Adam/LAMB
on GPU and CPU Adam under ZeRO offload, transformers' Adafactor, and pytorch-optimizer's Lion and LAMB.
"""

from __future__ import annotations

import re

import torch

from lmscale.config import OptimConfig
from lmscale.training.optimizers import OPTIMIZERS

LAYER_INDEX = re.compile(r"\.(?:h|layers|layer|blocks)\.(\d+)\.")


def parameter_kind(module: torch.nn.Module, param_name: str) -> str:
    """bias, norm, embedding or weight (the kinds weight decay may exempt), told by the owning module."""
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if isinstance(module, torch.nn.LayerNorm) or "norm" in type(module).__name__.lower():
        return "norm"  # LayerNorm, and the families' own RMSNorm classes
    return "bias" if param_name == "bias" else "weight"


def layer_depth(name: str, num_layers: int, kind: str) -> int:
    """0 for embeddings, i + 1 for block i, num_layers + 1 for the final norm and head."""
    match = LAYER_INDEX.search(f".{name}")
    if match:
        return int(match.group(1)) + 1
    return 0 if kind == "embedding" else num_layers + 1


def named_parameters_with_kind(model: torch.nn.Module):
    """(full name, parameter, kind) of each trainable parameter, tied ones once."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                yield f"{module_name}.{param_name}".lstrip("."), param, parameter_kind(module, param_name)


def matrix_modules() -> tuple[type, ...]:
    """Module types whose weight is one matrix of the network: torch's Linear and transformers' Conv1D
    (GPT-2's linear layers, with the weight stored transposed)."""
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D)


def muon_parameters(model: torch.nn.Module) -> set[int]:
    """The ids of the parameters Muon optimizes: the weight matrices of the blocks' linear layers.

    Chosen by module type and by block, not by parameter name: DeepSpeed's own tagging (`set_optimizer_flags`)
    keeps names containing "embed" or "lm_head" off Muon, which misses GPT-2's `wte`/`wpe` and any head of
    another name (a reward model's `score`). Embeddings, norms, biases and everything outside the blocks (the
    output layer, a value head) go to AdamW, as Muon's authors prescribe."""
    num_layers, kinds = num_layers_of(model), matrix_modules()
    chosen = set()
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, kinds) or weight is None or not weight.requires_grad or weight.dim() != 2:
            continue
        if 1 <= layer_depth(f"{module_name}.weight", num_layers, "weight") <= num_layers:
            chosen.add(id(weight))
    return chosen


def num_layers_of(model: torch.nn.Module) -> int:
    return getattr(getattr(model, "config", None), "num_hidden_layers", 0)


def is_expert_weight(name: str) -> bool:
    """A mixture-of-experts layer's expert weight (under an `experts` module: Mixtral's, Qwen3-MoE's, DeepSeek's
    routed experts; not a `shared_experts` module, which every token uses)."""
    return "experts" in name.split(".")[:-1]


def _grouped(
    model: torch.nn.Module, optim: OptimConfig, by_depth: bool, expert: int | None = None
) -> dict[tuple[int, bool, bool, bool], dict]:
    num_layers = num_layers_of(model)
    layered = optim.layer_lr_decay < 1 or by_depth
    muon = muon_parameters(model) if optim.name == "muon" else set()
    groups: dict[tuple[int, bool, bool, bool], dict] = {}
    for name, param, kind in named_parameters_with_kind(model):
        depth = layer_depth(name, num_layers, kind) if layered else 0
        decays = kind not in optim.no_weight_decay
        scale = optim.layer_lr_decay ** (num_layers + 1 - depth) if layered else 1.0
        uses_muon = id(param) in muon
        split = expert is not None and is_expert_weight(name)
        base_lr = optim.muon_lr if uses_muon else optim.lr
        group = groups.setdefault(
            (depth, decays, uses_muon, split),
            {"params": [], "weight_decay": optim.weight_decay if decays else 0.0, "lr": base_lr * scale},
        )
        if optim.name == "muon":
            param.use_muon = uses_muon  # ZeRO reads the tag to orthogonalize whole matrices
            group["use_muon"] = uses_muon
        if split:
            # DeepSpeed's AutoEP puts its grouped experts into the group their HF weights were in, and ZeRO
            # reduces a group marked `moe` over the ranks holding the same experts (named by expert group).
            group.update(moe=True, name=f"ep_size_{expert}")
        group["params"].append(param)
    return dict(sorted(groups.items()))


def parameter_groups(
    model: torch.nn.Module, optim: OptimConfig, by_depth: bool = False, expert: int | None = None
) -> list[dict]:
    """One group per (depth, decays?) with LR scale layer_lr_decay ** (distance from the top);
    `by_depth` keeps depths apart even without decay (gradual unfreezing switches whole depths); experts in
    groups of their own under AutoEP (`expert`: its degree, lmscale.parallel.autoep.autoep_degree).

    Groups are fixed before `deepspeed.initialize` (ZeRO flattens each group's parameters); the
    schedule multiplies every group's base LR by the same factor, so the ratios hold all run.
    """
    return list(_grouped(model, optim, by_depth, expert).values())


def group_depths(
    model: torch.nn.Module, optim: OptimConfig, by_depth: bool = False, expert: int | None = None
) -> list[int]:
    """The depth of each of `parameter_groups`' groups, in the same order (0 when not layered)."""
    return [depth for depth, *_ in _grouped(model, optim, by_depth, expert)]


def params_by_depth(model: torch.nn.Module) -> dict[int, list[torch.nn.Parameter]]:
    """The trainable parameters at each depth."""
    num_layers, found = num_layers_of(model), {}
    for name, param, kind in named_parameters_with_kind(model):
        found.setdefault(layer_depth(name, num_layers, kind), []).append(param)
    return found


def build_optimizer(
    model: torch.nn.Module,
    optim: OptimConfig,
    cpu_offload: bool,
    by_depth: bool = False,
    expert: int | None = None,
) -> torch.optim.Optimizer:
    """The optimizer `optim.name` names, over `parameter_groups`."""
    groups = parameter_groups(model, optim, by_depth, expert)
    return OPTIMIZERS[optim.name](groups, optim, torch.cuda.is_available(), cpu_offload)
