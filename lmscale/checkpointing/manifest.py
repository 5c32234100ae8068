"""A complete checkpoint's manifest (its COMPLETE marker): the job that wrote it (ranks, tensor, sequence and
expert degrees) and every file's size and checksum, so that a resume notices a file damaged after the fact."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch.distributed as dist

from lmscale.checkpointing.rundir import RunDir
from lmscale.errors import LmscaleError
from lmscale.parallel.engine import cpu_group


def new_checksum() -> Any:
    """The manifest's checksum, empty: a 128-bit BLAKE2b (fast, and any corruption changes it). Every writer of
    a manifest's checksums starts from this one, so a file hashed while written matches the same file read."""
    return hashlib.blake2b(digest_size=16)


def file_digest(path: Path) -> str:
    """The manifest's checksum of a file on disk."""
    digest = new_checksum()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_checksums(directory: Path, rank: int, world_size: int) -> list[tuple[str, str]]:
    """(name, checksum) of every file in `directory`, each rank reading its share (all ranks call it);
    every rank gets the whole list."""
    names = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    own = [(name, file_digest(directory / name)) for name in names[rank::world_size]]
    shares: list[Any] = [None] * world_size
    dist.all_gather_object(shares, own, group=cpu_group())
    return sorted(pair for share in shares for pair in share)


def checkpoint_meta(checkpoint: Path) -> dict[str, Any]:
    """The COMPLETE marker's record: step, world size, and the size of every file written."""
    try:
        return json.loads(RunDir.complete_marker(checkpoint).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise LmscaleError(
            f"checkpoint {checkpoint} has an unreadable {RunDir.complete_marker(checkpoint).name} marker: delete {checkpoint} to resume from "
            "the checkpoint before it"
        ) from None


def checkpoint_damage(checkpoint: Path) -> str | None:
    """What is wrong with a complete checkpoint's files against its manifest (sizes, then checksums), or None.

    Markers written before checksums were recorded hold sizes alone; those are checked by size.
    """
    for name, record in checkpoint_meta(checkpoint).get("files", {}).items():
        expected = record if isinstance(record, int) else record["bytes"]
        path = checkpoint / name
        actual = path.stat().st_size if path.is_file() else None
        if actual != expected:
            found = "is missing" if actual is None else f"has {actual} bytes of the {expected} written"
            return f"{name} {found}"
        if isinstance(record, dict) and file_digest(path) != record["blake2b"]:
            return f"{name} does not match the checksum it was written with"
    return None


def verify_checkpoint(checkpoint: Path) -> Path:
    """Every file the checkpoint was written with is there, at its size and checksum; else a one-line error."""
    damage = checkpoint_damage(checkpoint)
    if damage:
        raise LmscaleError(
            f"checkpoint {checkpoint} is damaged: {damage}; delete {checkpoint} to resume from the "
            "checkpoint before it, or set checkpoint.resume to another checkpoint"
        )
    return checkpoint


def written_by(checkpoint: Path) -> int:
    """How many ranks wrote `checkpoint`."""
    return int(checkpoint_meta(checkpoint)["world_size"])


def written_tensor_degree(checkpoint: Path) -> int:
    """The tensor-parallel degree of the job that wrote `checkpoint` (1 before lmscale recorded it)."""
    return max(1, int(checkpoint_meta(checkpoint).get("tensor", 1)))


def written_sequence_degree(checkpoint: Path) -> int:
    """The sequence-parallel degree of the job that wrote `checkpoint` (1 before lmscale recorded it)."""
    return int(checkpoint_meta(checkpoint).get("sequence", 1))


def written_expert_degree(checkpoint: Path) -> int:
    """The expert-parallel degree of the job that wrote `checkpoint` (1 before lmscale recorded it)."""
    return int(checkpoint_meta(checkpoint).get("expert", 1))


def written_folded(checkpoint: Path) -> bool:
    """Whether `checkpoint` was written with AutoEP folded into AutoTP (parallel.expert with parallel.tensor)."""
    return written_expert_degree(checkpoint) > 1 and written_tensor_degree(checkpoint) > 1


def written_with_autoep(checkpoint: Path) -> bool:
    """Whether the checkpoint holds AutoEP's MoE layers (grouped experts), whatever their split."""
    meta = checkpoint_meta(checkpoint)
    return bool(meta.get("autoep", int(meta.get("expert", 1)) > 1))
