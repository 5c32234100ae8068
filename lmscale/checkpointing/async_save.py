"""`checkpoint.async: true`: checkpoints whose files are written in the background, made complete by the
training loop once every rank's files are durable.

The commit protocol is the synchronous one's (`lmscale.checkpointing.checkpoint`): files go into
`<tag>.partial/`; when all ranks agree their writers are done, rank 0 renames it, writes the manifest with
every file's checksum, and moves `latest` last. A kill or a full disk mid-write therefore leaves the
previous checkpoint the newest complete one. At most one checkpoint is in flight: a save waits for the
one before it to complete.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lmscale.checkpointing.background import BackgroundFiles, BackgroundWriter, write_in_background
from lmscale.checkpointing.checkpoint import (
    abandon_partial,
    checkpoint_tag,
    complete_checkpoint,
    job_meta,
    write_partial,
)
from lmscale.checkpointing.rundir import RunDir
from lmscale.checkpointing.training_state import TrainingState
from lmscale.parallel.engine import cpu_group

log = logging.getLogger(__name__)


@dataclass
class InFlight:
    """A checkpoint whose files are still being written."""

    partial: Path
    meta: dict[str, Any]
    step: int
    saved_s: float  # when the loop handed it over (perf_counter)
    failure: OSError | None  # of the part written before the save returned
    on_complete: Callable[[], None]  # rank 0, once complete (e.g. mark it the best)


class AsyncCheckpoints:
    """One rank's checkpoints written in the background (every rank calls each method at the same points)."""

    def __init__(self, engine: Any, output_dir: Path, keep_last: int) -> None:
        self.engine, self.keep_last = engine, keep_last
        self.directory = RunDir(output_dir).checkpoints
        self.writer = BackgroundWriter()
        write_in_background(engine, self.writer)
        self.in_flight: InFlight | None = None

    def save(
        self,
        state: TrainingState,
        adapters_only: bool,
        sequence: int | None,
        on_complete: Callable[[], None] = lambda: None,
    ) -> Path:
        """Hand this step's checkpoint to the writer; returns the directory it will have once complete."""
        self.settle(wait=True)
        partial = self.directory / f"{checkpoint_tag(state.step)}.partial"
        self.writer.begin(state.step, partial, dist.get_rank())
        files = BackgroundFiles(self.writer)
        failure = write_partial(self.engine, partial, state, adapters_only, files)
        if failure is not None:
            files.finish(state.step, dist.get_rank())  # what was handed over is written, then removed
        meta = job_meta(self.engine, state.step, sequence)
        self.in_flight = InFlight(partial, meta, state.step, time.perf_counter(), failure, on_complete)
        return self.directory / checkpoint_tag(state.step)

    def settle(self, wait: bool) -> Path | None:
        """Complete the checkpoint in flight if every rank's files are durable (first waiting for this rank's
        with `wait`); its directory when completed now, else None. A write that failed on any rank removes
        the partial checkpoint and raises, naming the newest intact one."""
        pending = self.in_flight
        if pending is None:
            return None
        if wait:
            self.writer.wait()
        written = self.writer.current
        failure = pending.failure or written.failure
        flags = torch.tensor([0 if self.writer.done() else 1, 1 if failure else 0])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=cpu_group())
        if flags[1]:
            self.in_flight = None
            self.writer.wait()  # nothing may still write into the directory about to be removed
            abandon_partial(pending.partial, dist.get_rank(), pending.step, self.directory, failure)
        if flags[0]:
            return None
        shares: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(shares, written.digests, group=cpu_group())
        self.in_flight = None
        # Rank 0 prunes older checkpoints and `.partial` leftovers here without a barrier after it: no rank
        # writes the next checkpoint before DeepSpeed's barrier at the start of its save, after this.
        if dist.get_rank() == 0:
            checksums = sorted(pair for share in shares for pair in share)
            complete_checkpoint(
                pending.partial,
                pending.meta,
                checksums,
                self.keep_last,
                files_synced=True,
                prune_in_background=True,
            )
            pending.on_complete()
            log.info(
                "checkpoint: step %d complete, written in the background in %.1f s",
                pending.step,
                time.perf_counter() - pending.saved_s,
            )
        return self.directory / checkpoint_tag(pending.step)
