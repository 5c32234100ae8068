"""What one optimizer step really holds, from the epoch's plan: the honest batch line printed at start,
and `train.max_tokens` / `train.epochs` turned into optimizer steps (the LR schedule needs a step count
before training starts).

Under bucket/pack batching `train.micro_batch_size` only feeds DeepSpeed's nominal batch figure; the
real figures come from the token budget and the planned batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lmscale.config import Config
from lmscale.data.bucketing import FILLER, EpochPlan
from lmscale.errors import ConfigError


@dataclass(frozen=True)
class EpochFigures:
    groups: int  # micro-batch groups (one micro-batch per rank each) in an epoch
    sequences: int
    real_tokens: int
    padded_tokens: int


def epoch_figures(plan: EpochPlan, lengths: np.ndarray, pad_to: int | None) -> EpochFigures:
    """Sequences, real and padded tokens of one planned epoch, all ranks together."""
    padded = 0
    for group in plan.groups:
        for batch in group:
            rows = [int(r) for r in batch if r != FILLER]
            if not rows:
                padded += 1  # a filler batch is one padding token's row
                continue
            if plan.packed_rows is None:
                width = int(lengths[rows].max())
            else:
                width = max(int(lengths[plan.packed_rows[r]].sum()) for r in rows)
            padded += len(rows) * (pad_to or width)
    sequences = len(lengths)
    return EpochFigures(len(plan.groups), sequences, int(lengths.sum()), padded)


@dataclass(frozen=True)
class StepFigures:
    budget_tokens: int  # padded tokens a step may hold: budget x micro-batches x ranks
    real_tokens: float  # expected real tokens per step
    sequences: float
    steps_per_epoch: float


def step_figures(config: Config, epoch: EpochFigures | None, world_size: int) -> StepFigures:
    accum = config.train.grad_accum_steps
    if config.data.batching == "pad":
        per_batch = config.train.micro_batch_size * config.data.max_seq_len
    else:
        per_batch = int(config.data.max_tokens_per_batch)
    budget = per_batch * accum * world_size
    if epoch is None:  # streamed: no epoch is planned ahead
        return StepFigures(budget, math.nan, math.nan, math.nan)
    steps = epoch.groups / accum
    return StepFigures(budget, epoch.real_tokens / steps, epoch.sequences / steps, steps)


def steps_to_train(config: Config, figures: StepFigures) -> int:
    """train.max_steps, or the steps that train.max_tokens / train.epochs come to."""
    train = config.train
    if train.max_steps is not None:
        return train.max_steps
    if math.isnan(figures.steps_per_epoch):
        raise ConfigError(
            "train.max_tokens and train.epochs need a planned epoch, which streamed data has not: "
            "set train.max_steps with data.streaming"
        )
    if train.epochs is not None:
        return max(1, math.ceil(train.epochs * figures.steps_per_epoch))
    return max(1, math.ceil(train.max_tokens / figures.real_tokens))


def batch_line(figures: StepFigures, max_steps: int, config: Config) -> str:
    """One line that says what a step is: the budget and the real tokens, sequences, and the epochs run."""
    budget = f"{figures.budget_tokens:,} tokens per optimizer step budget"
    if math.isnan(figures.steps_per_epoch):
        return f"batch: {budget} (streamed data: real tokens shown as training logs them); {max_steps} steps"
    real_share = figures.real_tokens / figures.budget_tokens
    source = "" if config.train.max_steps is not None else f" (from {stop_key(config)})"
    units = "preference pairs" if config.data.format == "preference" else "sequences"
    return (
        f"batch: {budget}, ~{figures.real_tokens:,.0f} real ({real_share:.0%}); "
        f"~{figures.sequences:,.1f} {units} per step; {figures.steps_per_epoch:,.1f} steps per epoch; "
        f"{max_steps:,} steps{source} = {max_steps / figures.steps_per_epoch:,.2f} epochs, "
        f"~{max_steps * figures.real_tokens:,.0f} tokens"
    )


def stop_key(config: Config) -> str:
    train = config.train
    if train.epochs is not None:
        return f"train.epochs={train.epochs}"
    return f"train.max_tokens={train.max_tokens}"
