"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch

from lmscale.config import TrainConfig


def warmup_cosine_lr(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """LR at optimizer step `step` (0-based): linear warm-up to `lr`, then cosine decay to `min_lr`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices decay; biases, norms and embeddings do not (decaying them only hurts)."""
    decay, no_decay = [], []
    seen = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        is_embedding = "wte" in name or "wpe" in name or "embed" in name
        (no_decay if param.ndim < 2 or is_embedding else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, train: TrainConfig, cpu_offload: bool) -> torch.optim.Optimizer:
    """AdamW: DeepSpeed's CPU Adam when ZeRO offloads optimizer states (DeepSpeed requires it), torch's otherwise."""
    groups = parameter_groups(model, train.weight_decay)
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=train.lr, betas=train.betas, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=train.lr, betas=train.betas, fused=torch.cuda.is_available())


def build_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + cosine as a LambdaLR, which DeepSpeed steps once per optimizer step."""

    def factor(step: int) -> float:
        return warmup_cosine_lr(step, train.lr, train.min_lr, train.warmup_steps, train.max_steps) / train.lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
