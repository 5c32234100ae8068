"""DeepSpeed checkpoints under `<output_dir>/checkpoints/`, with lmscale's own state alongside."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def checkpoint_tag(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(engine: Any, output_dir: Path, step: int, client_state: dict[str, Any]) -> Path:
    """Save on every rank (DeepSpeed writes each rank's ZeRO shard); returns the checkpoint directory."""
    directory = output_dir / "checkpoints"
    # universal_checkpoint_info lets `deepspeed.checkpoint.ds_to_universal` convert this checkpoint
    # for a different number of ranks later; without it the conversion refuses.
    state = {**client_state, "step": step, "universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
    engine.save_checkpoint(str(directory), tag=checkpoint_tag(step), client_state=state)
    return directory / checkpoint_tag(step)
