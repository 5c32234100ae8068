"""When training stops before train.max_steps: too many non-finite steps in a row, or a held-out loss that
stopped improving (early stopping)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmscale.errors import LmscaleError

EARLY_STOP = "early stopping"


@dataclass
class NonFiniteGuard:
    """Counts optimizer steps DeepSpeed skipped in a row (non-finite gradients) from its host-side counter."""

    limit: int
    skipped_before: int = 0
    in_a_row: int = 0

    def check(self, skipped_total: int, step: int) -> bool:
        """True when this step was skipped; raises once `limit` steps in a row were."""
        skipped = skipped_total > self.skipped_before
        self.skipped_before = skipped_total
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if self.in_a_row >= self.limit:
            raise LmscaleError(
                f"{self.in_a_row} steps in a row up to step {step} had a non-finite loss or gradient: lower optim.lr "
                "or check the data; the last checkpoint saved before them is kept"
            )
        return skipped


@dataclass
class EarlyStopping:
    """Stop when `patience` evaluations in a row did not lower the best eval loss by more than `min_delta`."""

    patience: int | None
    min_delta: float
    best: float = math.inf
    stale: int = 0

    def should_stop(self, eval_loss: float) -> bool:
        if eval_loss < self.best - self.min_delta:
            self.best, self.stale = eval_loss, 0
        else:
            self.stale += 1
        return self.patience is not None and self.stale >= self.patience
