"""Where training stands, as a checkpoint keeps it beside DeepSpeed's own state (its client state)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrainingState:
    """What a resume needs beyond weights, optimizer, scheduler and RNG."""

    step: int
    tokens_seen: int
    data_position: dict[str, Any]  # rank 0's batch-stream position (planned batches: every rank's)
    best_eval_loss: float = math.inf
    rank_data_position: dict[str, Any] | None = None  # this rank's own, where ranks differ (streamed shards)

    @property
    def streamed(self) -> bool:
        return bool(self.data_position.get("streaming"))

    def own_data_position(self) -> dict[str, Any]:
        """The position this rank's stream continues from: planned batches share rank 0's; streamed shards
        each saved their own (empty when this rank saved none: written by another rank count)."""
        if self.streamed:
            return self.rank_data_position or {}
        if self.data_position.get("rollouts"):  # an online method's: the steps served, and its own rows
            return {**self.data_position, "rank": self.rank_data_position}
        return self.data_position

    def client_state(self) -> dict[str, Any]:
        """The part DeepSpeed saves (rank 0's) in its checkpoint; the rank's own position is a file of its own."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "data_position": self.data_position,
            "best_eval_loss": self.best_eval_loss,
        }

    @classmethod
    def from_client_state(
        cls, state: dict[str, Any], rank_data_position: dict[str, Any] | None = None
    ) -> TrainingState:
        return cls(
            step=int(state["step"]),
            tokens_seen=int(state["tokens_seen"]),
            data_position=state["data_position"],
            best_eval_loss=state.get("best_eval_loss", math.inf),  # absent from the oldest checkpoints
            rank_data_position=rank_data_position,
        )
