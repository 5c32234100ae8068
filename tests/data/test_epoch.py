"""The honest batch figures and train.max_tokens / train.epochs as steps, from an epoch's plan."""

import math

import numpy as np
import pytest

from lmscale.config import load_config
from lmscale.data.bucketing import plan_epoch
from lmscale.data.epoch import batch_line, epoch_figures, step_figures, steps_to_train
from lmscale.errors import ConfigError

LENGTHS = np.array([64] * 30 + [10] * 50 + [33] * 20)


def config(*overrides):
    return load_config(None, ["data.max_tokens_per_batch=256", "data.max_seq_len=64", *overrides])[0]


def test_epoch_figures_count_every_sequence_and_the_padding_the_plan_makes():
    plan = plan_epoch(LENGTHS, world_size=2, seed=0, epoch=0, max_tokens=256)
    figures = epoch_figures(plan, LENGTHS, pad_to=None)
    assert figures.sequences == 100 and figures.real_tokens == int(LENGTHS.sum())
    assert figures.groups == len(plan)
    widths = [
        len(batch) * int(LENGTHS[batch].max()) for group in plan.groups for batch in group if len(batch)
    ]
    assert figures.padded_tokens == sum(widths) >= figures.real_tokens
    padded = epoch_figures(plan_epoch(LENGTHS, 2, 0, 0, mode="pad", rows=4), LENGTHS, pad_to=64)
    assert padded.padded_tokens == 100 * 64


def test_step_figures_and_the_steps_that_tokens_or_epochs_come_to():
    plan = plan_epoch(LENGTHS, world_size=2, seed=0, epoch=0, max_tokens=256)
    epoch = epoch_figures(plan, LENGTHS, None)
    figures = step_figures(config("train.grad_accum_steps=2"), epoch, world_size=2)
    assert figures.budget_tokens == 256 * 2 * 2
    assert figures.steps_per_epoch == pytest.approx(len(plan) / 2)
    assert figures.real_tokens * figures.steps_per_epoch == pytest.approx(LENGTHS.sum())
    by_epochs = config("train.max_steps=null", "train.epochs=2.5", "train.grad_accum_steps=2")
    assert steps_to_train(by_epochs, figures) == math.ceil(2.5 * figures.steps_per_epoch)
    by_tokens = config("train.max_steps=null", "train.max_tokens=10000", "train.grad_accum_steps=2")
    steps = steps_to_train(by_tokens, figures)
    assert steps == math.ceil(10000 / figures.real_tokens)
    line = batch_line(figures, steps, by_tokens)
    assert (
        line.startswith("batch: 1,024 tokens per optimizer step budget")
        and "from train.max_tokens=10000" in line
        and "sequences per step" in line
    )
    pairs = config("data.format=preference", "finetune.method=dpo", "data.max_tokens_per_batch=256")
    assert "preference pairs per step" in batch_line(figures, steps, pairs)


def test_pad_budget_is_rows_times_length_and_streams_need_steps():
    figures = step_figures(config("data.batching=pad", "train.micro_batch_size=8"), None, world_size=4)
    assert figures.budget_tokens == 8 * 64 * 4 and math.isnan(figures.steps_per_epoch)
    with pytest.raises(ConfigError, match="set train.max_steps with data.streaming"):
        steps_to_train(config("train.max_steps=null", "train.epochs=1"), figures)
    assert steps_to_train(config(), figures) == 250
