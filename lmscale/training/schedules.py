"""Learning-rate schedules as pure functions of the optimizer step.

Every schedule starts with a linear warm-up over `schedule.warmup_steps` to `optim.lr`; what follows is
chosen by `schedule.name`, a key of SCHEDULES (the config reads its choices from there). Written as
plain functions (not torch's scheduler classes) so that one value per step is defined in one place:
the LambdaLR that DeepSpeed steps, the unit tests and `lmscale schedule --plot` all read the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from lmscale.errors import LmscaleError

if TYPE_CHECKING:  # the config imports this module for the schedule names: no import back at run time
    import torch

    from lmscale.config import Config, ScheduleConfig


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


# Each schedule's LR `t` steps after the warm-up, of `total` such steps, peaking at `lr`.
def constant(t: int, total: int, lr: float, s: ScheduleConfig) -> float:
    return lr


def linear(t: int, total: int, lr: float, s: ScheduleConfig) -> float:
    return lr + (s.min_lr - lr) * min(1.0, t / max(1, total))


def cosine(t: int, total: int, lr: float, s: ScheduleConfig) -> float:
    return _cosine(t / max(1, total), lr, s.min_lr)


def cosine_restarts(t: int, total: int, lr: float, s: ScheduleConfig) -> float:
    position, length = _restart_position(t, s.restart_period, s.restart_mult)
    return _cosine(position / length, lr, s.min_lr)


def step_decay(t: int, total: int, lr: float, s: ScheduleConfig) -> float:
    return lr * s.decay_gamma ** (t // s.decay_every)


def exponential(t: int, total: int, lr: float, s: ScheduleConfig) -> float:
    """Geometric from lr to min_lr over the run."""
    return lr * (max(s.min_lr, 1e-12) / lr) ** min(1.0, t / max(1, total))


def piecewise(t: int, total: int, lr: float, s: ScheduleConfig) -> float:
    """Linear between [step, lr] points given in absolute steps (see lr_at)."""
    import numpy as np

    steps, values = zip(*s.lr_points, strict=True)
    return float(np.interp(t + s.warmup_steps, steps, values))


def cyclic(t: int, total: int, lr: float, s: ScheduleConfig) -> float:
    """After a warm-up the cycles start at the peak it reached."""
    offset = s.cycle_steps if s.warmup_steps else 0
    return s.min_lr + (lr - s.min_lr) * _triangle(t + offset, s.cycle_steps, s.cycle_mode)


def wsd(t: int, total: int, lr: float, s: ScheduleConfig) -> float:
    """Warm-up, stable at lr, then a linear decay to min_lr over the last decay_fraction."""
    decay_start = total * (1.0 - s.decay_fraction)
    return (
        lr if t < decay_start else lr + (s.min_lr - lr) * (t - decay_start) / max(1e-9, total - decay_start)
    )


SCHEDULES: dict[str, Callable[[int, int, float, ScheduleConfig], float]] = {
    "constant": constant,
    "linear": linear,
    "cosine": cosine,
    "cosine_restarts": cosine_restarts,
    "step": step_decay,
    "exponential": exponential,
    "piecewise": piecewise,
    "cyclic": cyclic,
    "wsd": wsd,
}


def lr_at(step: int, config: Config) -> float:
    """LR of optimizer step `step` (0-based): a linear warm-up to optim.lr (to the first piecewise value
    for `piecewise`, whose points are absolute steps), then schedule.name over the steps after it."""
    lr, max_steps = config.optim.lr, config.train.max_steps
    s = config.schedule.settled(lr, max_steps)
    after = SCHEDULES[s.name]
    if s.name == "piecewise":
        target = after(max(step - s.warmup_steps, 0), 0, lr, s)
        return target * (step + 1) / s.warmup_steps if step < s.warmup_steps else target
    if step < s.warmup_steps:
        return lr * (step + 1) / s.warmup_steps
    return after(step - s.warmup_steps, max_steps - s.warmup_steps, lr, s)


def lr_curve(config: Config) -> list[float]:
    """The LR of every step of the run."""
    return [lr_at(step, config) for step in range(config.train.max_steps)]


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    config: Config,
    group_gates: list[Callable[[int], bool]] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule as a LambdaLR factor of each group's base LR (so layer-wise LR ratios are kept);
    DeepSpeed steps it once per optimizer step. `group_gates[i](step)` False holds group i at LR 0
    (a layer gradual unfreezing has not opened yet)."""
    import torch

    if group_gates is None:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_at(step, config) / config.optim.lr
        )
    factors = [partial(_gated_factor, config=config, gate=gate) for gate in group_gates]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def _gated_factor(step: int, config: Config, gate: Callable[[int], bool]) -> float:
    return lr_at(step, config) / config.optim.lr if gate(step) else 0.0


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


def schedule_command(config: Config, plot: Path | None) -> None:
    """`lmscale schedule`: the LR at a few marked steps of the whole run, and optionally its plot."""
    if config.train.max_steps is None:
        raise LmscaleError(
            "lmscale schedule needs train.max_steps: train.max_tokens and train.epochs become steps only when "
            "a run plans its data (its 'lmscale: batch:' line says how many); pass train.max_steps=N"
        )
    curve = lr_curve(config)
    warmup = config.schedule.warmup_for(len(curve))
    last = len(curve) - 1
    marks = sorted({0, warmup, len(curve) // 4, len(curve) // 2, 3 * len(curve) // 4, last})
    print(f"{config.schedule.name} schedule, {len(curve)} steps, warm-up {warmup}:")
    for step in marks:
        print(f"  step {step + 1:>8}: lr {curve[step]:.3e}")
    if plot is not None:
        plot_curve(curve, config.schedule.name, plot)
        print(plot)
