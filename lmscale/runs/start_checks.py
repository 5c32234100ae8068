"""The start-up checks of a run's directory, done the same way wherever a run starts (`lmscale train`, the
launcher before any rank starts, `lmscale slurm submit` before the job is queued): `open_run` calls them."""

from __future__ import annotations

from lmscale.checkpointing.checkpoint import find_resume_checkpoint
from lmscale.checkpointing.rundir import RunDir, check_output_dir, check_resume_compatible
from lmscale.checkpointing.runlock import check_unlocked
from lmscale.config import Config


def check_start(config: Config, run_dir: RunDir, force: bool, find_checkpoint: bool = True) -> None:
    """`run_dir` can hold this run: writable, not in use by a live job, and (unless --force replaces it)
    holding nothing this config would silently train differently, with the checkpoint to resume present
    and intact (`find_checkpoint=False` where the caller finds it next: verifying reads every byte)."""
    check_output_dir(run_dir.root, force, config.checkpoint.resume)
    check_unlocked(run_dir.root)
    if not force:
        check_resume_compatible(run_dir.root, config)
        if find_checkpoint:
            find_resume_checkpoint(run_dir.root, config.checkpoint.resume)
