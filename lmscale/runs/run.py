"""What a run knows, resolved once: the config, DeepSpeed's config, the rank layout, this process's ranks,
the run directory and the device.

Every command that runs or plans a job (`train`, each rank, `launch`, `slurm submit`, `plan`, `sweep`)
builds one with `open_run`, which also does the start-up checks, the same way everywhere. What a run settles
later (the automatic token budget, the step count of `train.max_tokens`) comes back as a new Run: the
validated config is never assigned into.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

from lmscale.checkpointing.mirror import check_mirror, restore_from_mirror
from lmscale.checkpointing.rundir import RunDir
from lmscale.config import Config
from lmscale.data.remote import begin_start
from lmscale.parallel.layout import Layout
from lmscale.runs.preflight import resolve_run_config
from lmscale.runs.start_checks import check_start


class StartChecks(Enum):
    """How much of the run directory `open_run` checks."""

    NONE = "none"  # planning, a dry run: nothing will be written
    DIRECTORY = "directory"  # writable, unlocked, compatible; the caller finds the checkpoint itself
    FULL = "full"  # and the checkpoint to resume is present and intact (reads every byte)


@dataclass(frozen=True)
class Run:
    """One run as this process sees it."""

    config: Config
    ds_config: dict[str, Any]
    layout: Layout
    dir: RunDir
    rank: int = 0  # this process's global rank
    local_rank: int = 0  # its rank on this node (its GPU)
    device: str = "cpu"  # "cuda" where the job runs on GPUs
    force: bool = False  # --force: replace the run in dir instead of resuming it

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def data_rank(self) -> int:
        """This rank's data-parallel replica (the ranks of a tensor or sequence group share batches)."""
        return self.layout.data_rank(self.rank)

    def settled(self, section: str, **values: Any) -> Run:
        """This run with `values` settled into config section `section`, validated again (a new Run)."""
        current = getattr(self.config, section)
        validated = type(current).model_validate({**current.model_dump(), **values})
        return replace(self, config=self.config.model_copy(update={section: validated}))

    def with_ds_config(self, ds_config: dict[str, Any]) -> Run:
        return replace(self, ds_config=ds_config)


def open_run(
    config_path: str | None,
    overrides: list[str],
    world_size: int,
    has_gpu: bool,
    *,
    rank: int = 0,
    local_rank: int = 0,
    force: bool = False,
    checks: StartChecks = StartChecks.FULL,
) -> Run:
    """Load, validate and complete the config for `world_size` ranks on this kind of device, then check
    the run directory; a failed start raises one error and writes nothing."""
    begin_start()  # data at URLs is listed once from here on
    config, ds_config = resolve_run_config(config_path, overrides, world_size, has_gpu)
    parallel = config.parallel
    layout = Layout(world_size, parallel.tensor, parallel.sequence, parallel.expert)
    device = "cuda" if has_gpu else "cpu"
    run = Run(config, ds_config, layout, RunDir.of(config), rank, local_rank, device, force)
    if checks is not StartChecks.NONE and config.checkpoint.mirror and not force:
        settings = config.checkpoint
        check_mirror(settings.mirror, settings.mirror_options)
        restore_from_mirror(settings.mirror, settings.mirror_options, run.dir)  # if none is here
    if checks is not StartChecks.NONE:
        check_start(run.config, run.dir, force, find_checkpoint=checks is StartChecks.FULL)
    return run
