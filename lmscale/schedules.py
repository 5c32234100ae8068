"""Learning-rate schedules as pure functions of the optimizer step.

Every schedule starts with a linear warm-up over `train.warmup_steps` to `train.lr`; what follows is
chosen by `train.scheduler`. Written as plain functions (not torch's scheduler classes) so that one
value per step is defined in one place: the LambdaLR that DeepSpeed steps, the unit tests and
`lmscale schedule --plot` all read the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from lmscale.config import TrainConfig

SCHEDULES = (
    "constant",
    "linear",
    "cosine",
    "cosine_restarts",
    "step",
    "exponential",
    "piecewise",
    "cyclic",
    "wsd",
)


def _cosine(progress: float, high: float, low: float) -> float:
    return low + 0.5 * (high - low) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _restart_position(t: int, period: int, mult: float) -> tuple[int, int]:
    """(steps into the current cycle, the cycle's length) when cycles grow by `mult`."""
    length = period
    while t >= length:
        t -= length
        length = max(1, round(length * mult))
    return t, length


def _triangle(t: int, half_cycle: int, mode: str) -> float:
    """Smith's cyclical LR: a 0 -> 1 -> 0 triangle per cycle, halved each cycle in triangular2."""
    cycle = t // (2 * half_cycle)
    height = 1.0 - abs((t % (2 * half_cycle)) / half_cycle - 1.0)
    return height * (0.5**cycle if mode == "triangular2" else 1.0)


def _after_warmup(t: int, total: int, c: TrainConfig) -> float:
    """LR `t` steps after the warm-up, of `total` such steps."""
    lr, low = c.lr, c.min_lr
    progress = t / max(1, total)
    if c.scheduler == "constant":
        return lr
    if c.scheduler == "linear":
        return lr + (low - lr) * min(1.0, progress)
    if c.scheduler == "cosine":
        return _cosine(progress, lr, low)
    if c.scheduler == "cosine_restarts":
        position, length = _restart_position(t, c.restart_period, c.restart_mult)
        return _cosine(position / length, lr, low)
    if c.scheduler == "step":
        return lr * c.decay_gamma ** (t // c.decay_every)
    if c.scheduler == "exponential":  # geometric from lr to min_lr over the run
        return lr * (max(low, 1e-12) / lr) ** min(1.0, progress)
    if c.scheduler == "cyclic":  # after a warm-up the cycles start at the peak it reached
        offset = c.cycle_steps if c.warmup_steps else 0
        return low + (lr - low) * _triangle(t + offset, c.cycle_steps, c.cycle_mode)
    if c.scheduler == "wsd":  # warm-up, stable at lr, then a linear decay over the last decay_fraction
        decay_start = total * (1.0 - c.decay_fraction)
        return lr if t < decay_start else lr + (low - lr) * (t - decay_start) / max(1e-9, total - decay_start)
    raise ValueError(f"unknown schedule {c.scheduler}")


def _piecewise(step: int, c: TrainConfig) -> float:
    steps, values = zip(*c.lr_points, strict=True)
    return float(np.interp(step, steps, values))


def lr_at(step: int, c: TrainConfig) -> float:
    """LR of optimizer step `step` (0-based). `piecewise` points are in absolute steps; the others run
    their shape over the steps after the warm-up."""
    if c.scheduler == "piecewise":
        target = _piecewise(max(step, c.warmup_steps), c)
        return target * (step + 1) / c.warmup_steps if step < c.warmup_steps else target
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    return _after_warmup(step - c.warmup_steps, c.max_steps - c.warmup_steps, c)


def lr_curve(c: TrainConfig) -> list[float]:
    """The LR of every step of the run."""
    return [lr_at(step, c) for step in range(c.max_steps)]


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    c: TrainConfig,
    group_gates: list[Callable[[int], bool]] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule as a LambdaLR factor of each group's base LR (so layer-wise LR ratios are kept);
    DeepSpeed steps it once per optimizer step. `group_gates[i](step)` False holds group i at LR 0
    (a layer gradual unfreezing has not opened yet)."""
    if group_gates is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, c) / c.lr)
    factors = [partial(_gated_factor, c=c, gate=gate) for gate in group_gates]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def _gated_factor(step: int, c: TrainConfig, gate: Callable[[int], bool]) -> float:
    return lr_at(step, c) / c.lr if gate(step) else 0.0


def plot_curve(curve: list[float], name: str, path: Path) -> None:
    """The LR of every step as a PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 3.5))
    axes.plot(range(1, len(curve) + 1), curve)
    axes.set(title=f"LR schedule: {name}", xlabel="optimizer step", ylabel="learning rate")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
