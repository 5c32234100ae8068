"""Atomic, resumable DeepSpeed checkpoints under `<output_dir>/checkpoints/`.

A checkpoint counts only when complete: every rank writes into `<tag>.partial/`, all ranks wait for
each other, then rank 0 syncs the files, renames the directory to `<tag>/`, writes a `COMPLETE`
marker, and moves the `latest` pointer last. A crash at any moment leaves either the previous
checkpoint as the newest complete one, or a `.partial` directory that is skipped with a warning.

Next to DeepSpeed's own files (model, optimizer and scheduler state, ZeRO shards), each rank saves its
RNG states in `rng_rank<R>.pt`, loaded back with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lmscale.errors import ConfigError, LmscaleError

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")


def checkpoint_tag(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "numpy_meta": [kind, position, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    kind, position, has_gauss, cached = state["numpy_meta"]
    np.random.set_state((kind, state["numpy"].numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    with temporary.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def save_checkpoint(
    engine: Any, output_dir: Path, step: int, client_state: dict[str, Any], keep_last: int
) -> Path:
    """Save on every rank (DeepSpeed writes each rank's ZeRO shard), atomically; returns the checkpoint dir."""
    directory = output_dir / "checkpoints"
    tag = checkpoint_tag(step)
    partial_tag = f"{tag}.partial"
    rank = dist.get_rank()
    # universal_checkpoint_info lets `deepspeed.checkpoint.ds_to_universal` convert this checkpoint
    # for a different number of ranks later; without it the conversion refuses.
    state = {**client_state, "step": step, "universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
    engine.save_checkpoint(str(directory), tag=partial_tag, client_state=state, save_latest=False)
    torch.save(rng_state(), directory / partial_tag / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        final = directory / tag
        if final.exists():  # a checkpoint of the same step from an earlier attempt
            shutil.rmtree(final)
        _fsync_tree(directory / partial_tag)
        os.replace(directory / partial_tag, final)
        _write_atomically(
            final / COMPLETE, json.dumps({"step": step, "world_size": dist.get_world_size()}) + "\n"
        )
        _write_atomically(directory / "latest", tag)  # the pointer moves last
        prune_checkpoints(directory, keep_last)
    dist.barrier()
    return directory / tag


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first; partial ones are reported and skipped."""
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.iterdir()):
        if path.is_dir() and TAG_PATTERN.match(path.name) and (path / COMPLETE).is_file():
            found.append(path)
        elif path.is_dir() and (path.name.endswith(".partial") or TAG_PATTERN.match(path.name)):
            log.warning("checkpoint: skipping incomplete %s (the run stopped while writing it)", path)
    return found


def prune_checkpoints(directory: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints and the best one (by eval loss), if marked."""
    checkpoints = complete_checkpoints(directory)
    best = (
        (directory / "best").read_text(encoding="utf-8").strip() if (directory / "best").is_file() else None
    )
    for path in checkpoints[:-keep_last]:
        if path.name != best:
            shutil.rmtree(path, ignore_errors=True)
    for stale in directory.glob("*.partial"):  # an earlier attempt's leftovers
        shutil.rmtree(stale, ignore_errors=True)


def mark_best(output_dir: Path, step: int) -> None:
    """Record the checkpoint of `step` as the best so far by eval loss (rank 0)."""
    _write_atomically(output_dir / "checkpoints" / "best", checkpoint_tag(step))


def find_resume_checkpoint(output_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: `auto` = newest complete one in the run dir; `none`; or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        checkpoints = complete_checkpoints(output_dir / "checkpoints")
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"train.resume={resume} does not exist: give a checkpoint directory, or use auto")
    if not (path / COMPLETE).is_file():
        raise ConfigError(
            f"train.resume={resume} is not a complete lmscale checkpoint (no {COMPLETE} marker): pick another"
        )
    return path


def load_checkpoint(engine: Any, checkpoint: Path) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG; returns the client state."""
    meta = json.loads((checkpoint / COMPLETE).read_text(encoding="utf-8"))
    if meta["world_size"] != dist.get_world_size():
        raise LmscaleError(
            f"{checkpoint} was written by {meta['world_size']} rank(s) but this job has {dist.get_world_size()}: "
            "resume with the same number of ranks"
        )
    try:
        _, client_state = engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    except Exception as exc:  # torch/pickle/DeepSpeed raise many types for a damaged or foreign checkpoint
        raise LmscaleError(
            f"{checkpoint} does not fit this model ({type(exc).__name__}): resume with the config it was trained with"
        ) from None
    if client_state is None:
        raise LmscaleError(
            f"{checkpoint} could not be read: it is damaged; remove it to resume from an older one"
        )
    set_rng_state(torch.load(checkpoint / f"rng_rank{dist.get_rank()}.pt", weights_only=True))
    return client_state
