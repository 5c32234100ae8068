"""Direct preference optimisation: the losses, the objective the loop trains with, and the reference.

The reference model is the starting model. Its log-probabilities of every pair's replies are computed
once, before the first step (in eval mode; with LoRA, on the base with the adapters switched off), and
kept in the run dir, so training holds no second model and a resumed run compares against exactly the
same numbers. The loss formulas follow TRL's `DPOTrainer` (a parity test checks them against it):
sigmoid and hinge on summed log-ratios, IPO on per-token mean log-ratios.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lmscale.atomic import write_atomically
from lmscale.config import DpoConfig
from lmscale.data.batches import REFERENCE_COLUMNS, SECOND_ROWS, Batch, BatchStream
from lmscale.data.bucketing import FILLER
from lmscale.errors import LmscaleError
from lmscale.objectives.loss import LossParts, Objective, forward, token_logps

PAIR_REFERENCE = REFERENCE_COLUMNS["rejected_ids"]


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its targets (in fp32) and how many targets it has."""
    logps, is_target = token_logps(logits, labels)
    return logps.sum(dim=1), is_target.sum(dim=1)


def sigmoid_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, **_) -> torch.Tensor:
    return -F.logsigmoid(beta * (chosen - rejected))


def hinge_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, **_) -> torch.Tensor:
    return torch.relu(1 - beta * (chosen - rejected))


def ipo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    beta: float,
    chosen_targets: torch.Tensor,
    rejected_targets: torch.Tensor,
) -> torch.Tensor:
    # per-token means: the squared loss would otherwise grow with the replies' lengths
    delta = chosen / chosen_targets.clamp(min=1) - rejected / rejected_targets.clamp(min=1)
    return (delta - 1 / (2 * beta)) ** 2


DPO_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
}


@dataclass
class PairScores:
    losses: torch.Tensor  # one per pair
    chosen_rewards: torch.Tensor  # beta x log-ratio to the reference, no gradient
    rejected_rewards: torch.Tensor


def pair_scores(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    targets: torch.Tensor,
    settings: DpoConfig,
) -> PairScores:
    """DPO losses and rewards of P pairs from [2P] per-row values: chosen rows first, then rejected."""
    pairs = policy_logps.size(0) // 2
    ratios = policy_logps - reference_logps
    chosen, rejected = ratios[:pairs], ratios[pairs:]
    losses = DPO_LOSSES[settings.loss](
        chosen, rejected, settings.beta, chosen_targets=targets[:pairs], rejected_targets=targets[pairs:]
    )
    return PairScores(losses, settings.beta * chosen.detach(), settings.beta * rejected.detach())


def preference_figures(scores: PairScores) -> dict[str, torch.Tensor]:
    """Sums over the pairs of what is logged as means; a tie (the policy is the reference) counts half."""
    chosen, rejected = scores.chosen_rewards, scores.rejected_rewards
    wins = (chosen > rejected).double() + 0.5 * (chosen == rejected).double()
    return {
        "rewards_chosen": chosen.sum(),
        "rewards_rejected": rejected.sum(),
        "rewards_margin": (chosen - rejected).sum(),
        "pref_accuracy": wins.sum(),
    }


def dpo_objective(settings: DpoConfig) -> Objective:
    """The loop's objective for preference pairs: DPO's loss summed over the batch's pairs."""

    def objective(engine: Any, batch: Batch) -> LossParts:
        logits, labels = forward(engine, batch)
        logps, targets = sequence_logps(logits, labels)
        pairs = batch.pairs
        reference = torch.cat([batch[name] for name in PAIR_REFERENCE]).to(logps.device)
        # a filler batch (pairs == 0) still sums to a 0 joined to the graph: its backward keeps ZeRO in step
        scores = pair_scores(logps[: 2 * pairs], reference, targets[: 2 * pairs], settings)
        return LossParts(scores.losses.sum(), pairs, preference_figures(scores))

    return objective


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module):
    """The base model for the duration, when `model` is a peft model with adapters; else nothing changes."""
    disable = getattr(model, "disable_adapter", None)
    with disable() if callable(disable) else contextlib.nullcontext():
        yield


@torch.no_grad()
def reference_logps(
    engine: Any, stream: BatchStream, progress: Callable[[], None] = lambda: None
) -> np.ndarray:
    """[records, 2] log-probabilities of both rows of each two-row record (a pair's chosen and rejected
    reply, an unpaired record's completion and KL sequence) under the model as it is now.

    `stream` plans the records over the ranks unshuffled; every rank scores its own batches (the same
    number on every rank, as ZeRO-3's gathers need), and the results are gathered onto every rank.
    """
    plan = stream.plan(0)
    rows: list[int] = []
    values: list[list[float]] = []
    engine.eval()
    with adapters_off(engine.module):
        for group, batch in zip(range(len(plan)), stream.loader(0, 0), strict=True):
            logits, labels = forward(engine, batch)
            logps, _ = sequence_logps(logits, labels)
            pairs = batch.pairs
            rows += [int(r) for r in plan.groups[group][stream.rank] if r != FILLER]
            values += torch.stack([logps[:pairs], logps[pairs : 2 * pairs]], dim=1).tolist()
            progress()
    engine.train()
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (rows, values))
    table = np.full((len(stream.sequences), 2), np.nan)
    for part_rows, part_values in gathered:
        if part_rows:
            table[part_rows] = part_values
    return table


def with_reference(records, table: np.ndarray, split: str):
    """Two-row records (pairs, unpaired records) with the reference log-probabilities of both rows as
    columns (what the batches carry)."""
    if table.shape != (len(records), 2) or np.isnan(table).any():
        raise LmscaleError(
            f"the run's reference log-probabilities do not cover the {len(records)} {split} records of the data "
            "(it changed since the run started): restore the data, or start a new run (--force)"
        )
    second = next(name for name in SECOND_ROWS if name in records.column_names)
    for index, name in enumerate(REFERENCE_COLUMNS[second]):
        if name in records.column_names:
            records = records.remove_columns(name)
        records = records.add_column(name, table[:, index].astype(np.float32).tolist())
    return records


def save_reference(path: Path, tables: dict[str, np.ndarray]) -> None:
    """Written whole or not at all (a crash mid-write must not leave a run that resumes against garbage)."""
    buffer = io.BytesIO()
    np.savez(buffer, **tables)
    write_atomically(path, buffer.getvalue())


def load_reference(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise LmscaleError(
            f"{path} is missing: a DPO or KTO run resumes against the reference log-probabilities it computed at its "
            "start; start a new run (--force) to compute them again"
        )
    with np.load(path) as tables:
        return {split: tables[split] for split in tables.files}
