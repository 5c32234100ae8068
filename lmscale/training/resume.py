"""Resuming a run: which checkpoint (converted for another rank count when needed), loading it with the
data position, and the loop's save hook that writes the next one."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from lmscale.checkpointing.async_save import AsyncCheckpoints
from lmscale.checkpointing.checkpoint import (
    UNIVERSAL_OPTIMIZERS,
    checkpoint_tag,
    ensure_universal,
    find_resume_checkpoint,
    load_checkpoint,
    mark_best,
    needs_universal,
    save_checkpoint,
)
from lmscale.checkpointing.manifest import (
    written_by,
    written_expert_degree,
    written_sequence_degree,
    written_tensor_degree,
    written_with_autoep,
)
from lmscale.checkpointing.mirror import CheckpointMirror
from lmscale.checkpointing.rundir import truncate_metrics
from lmscale.checkpointing.training_state import TrainingState
from lmscale.errors import ConfigError, LmscaleError
from lmscale.model.finetune import Unfreezing
from lmscale.parallel.layout import Layout
from lmscale.runs.run import Run
from lmscale.training.loop import LoopStart, SavePoint

log = logging.getLogger("lmscale")


@dataclass
class Resume:
    checkpoint: Path | None
    universal: bool  # re-partition ZeRO states written by another rank count
    ds_config_change: dict = field(default_factory=dict)  # what the DeepSpeed config needs to load it

    def apply_to(self, ds_config: dict) -> dict:
        """The DeepSpeed config with this resume's change (a new dict)."""
        merged = dict(ds_config)
        for section, values in self.ds_config_change.items():
            merged[section] = {**merged.get(section, {}), **values}
        return merged


def plan_resume(run: Run) -> Resume:
    """The checkpoint to resume from; one written by another rank count is converted first (before
    the process group exists, so a long conversion cannot time out a collective)."""
    config, world_size = run.config, run.world_size
    checkpoint = None if run.force else find_resume_checkpoint(run.dir.root, config.checkpoint.resume)
    change: dict = {}
    if checkpoint is not None:
        check_sequence_layout(checkpoint, config.parallel.sequence, world_size)
        check_expert_layout(checkpoint, config.parallel.expert, world_size, config.zero.stage)
        change = expert_layers_change(checkpoint, config.parallel.expert, run.is_rank_zero)
    tensor, expert = config.parallel.tensor, config.parallel.expert
    universal = checkpoint is not None and needs_universal(
        checkpoint, world_size, config.zero.stage, tensor, expert
    )
    if not universal:
        return Resume(checkpoint, universal, change)
    if config.optim.name not in UNIVERSAL_OPTIMIZERS:
        # deepspeed.checkpoint.ds_to_universal reads Adam's moments (exp_avg, exp_avg_sq) of every parameter
        # and fails on Muon's momentum buffers, SGD's, Lion's, Adafactor's (KeyError: 'exp_avg', 0.19.8).
        raise ConfigError(
            f"{checkpoint} was written by {written_by(checkpoint)} rank(s) with optim.name={config.optim.name}, "
            f"whose states DeepSpeed's universal conversion cannot re-split for {world_size}: resume it on "
            f"{written_by(checkpoint)} rank(s)"
        )
    ensure_universal(checkpoint, world_size)
    return Resume(checkpoint, universal, {**change, "checkpoint": {"load_universal": True}})


def check_sequence_layout(checkpoint: Path, sequence: int, world_size: int) -> None:
    """A sequence-parallel checkpoint resumes on its own layout only: DeepSpeed's universal conversion would
    read its sequence-parallel ranks' files as tensor-parallel slices."""
    written, written_ranks = written_sequence_degree(checkpoint), written_by(checkpoint)
    if (written, written_ranks) == (sequence, world_size) or (written == 1 and sequence == 1):
        return
    raise LmscaleError(
        f"{checkpoint} was written with parallel.sequence={written} on {written_ranks} rank(s): resume it with "
        f"the same (now parallel.sequence={sequence} on {world_size}); a sequence-parallel run changes neither "
        "its sequence degree nor its rank count on resume"
    )


def expert_layers_change(checkpoint: Path, expert: int, say: bool) -> dict:
    """The DeepSpeed config change a checkpoint's MoE layers need: AutoEP's grouped experts (written with
    parallel.expert > 1) load into AutoEP's layers only, so a resume without expert parallelism keeps them,
    every expert on every rank (AutoEP at degree 1). HF's experts do not load into AutoEP's layers."""
    autoep = written_with_autoep(checkpoint)
    if autoep and expert == 1:
        if say:
            log.info(
                "resume: %s holds AutoEP's grouped experts (written with parallel.expert=%d): they stay AutoEP "
                "layers, every expert on every rank",
                checkpoint,
                written_expert_degree(checkpoint),
            )
        return {"expert_parallel": {"enabled": True, "autoep_size": 1}}
    if not autoep and expert > 1:
        raise ConfigError(
            f"{checkpoint} was written without expert parallelism, whose experts AutoEP's layers cannot load: "
            f"resume it with parallel.expert=1, or start a new run from its export (lmscale export; model.path) "
            f"with parallel.expert={expert}"
        )
    return {}


def check_expert_layout(checkpoint: Path, expert: int, world_size: int, zero_stage: int) -> None:
    """Experts move to another split through the universal conversion, which needs ZeRO's partitioned files:
    a ZeRO-0 checkpoint with split experts resumes on its own layout only. (Layouts with experts and tensors
    split together convert through lmscale.checkpointing.folded_universal, and load through
    lmscale.parallel.autoep.universal_form_loads_into_folding.)"""
    written, written_ranks = written_expert_degree(checkpoint), written_by(checkpoint)
    if zero_stage == 0 and written > 1 and (written, written_ranks) != (expert, world_size):
        raise ConfigError(
            f"{checkpoint} was written with parallel.expert={written} on {written_ranks} rank(s); under "
            f"zero.stage=0 it resumes on that layout only (now parallel.expert={expert} on {world_size}): use "
            "that layout, or start a new run from its export (lmscale export; model.path)"
        )


def resume_point(engine, train_stream, run: Run, resume: Resume) -> LoopStart:
    """Load the checkpoint to resume from (if any) and return where the loop starts."""
    checkpoint = resume.checkpoint
    if checkpoint is None:
        return LoopStart()
    adapters_only = run.config.finetune.lora is not None
    state = load_checkpoint(engine, checkpoint, run.config.seed, resume.universal, adapters_only)
    if not train_stream.load_state_dict(state.own_data_position()):
        log.warning(
            "resume: the streamed corpus starts over (the checkpoint was written with another rank count or "
            "data.num_workers, so its stream positions do not apply)"
        )
    log.info("resume: continuing from %s (step %d)", checkpoint, state.step)
    if run.is_rank_zero:
        truncate_metrics(run.dir.root, state.step)
        describe_layout_change(checkpoint, run.layout, state.streamed, run.config.train.grad_accum_steps)
    return LoopStart(state.step, state.tokens_seen, state.best_eval_loss)


def describe_layout_change(checkpoint: Path, now: Layout, streamed: bool, accumulation: int) -> None:
    """Say what changed when a checkpoint continues on another rank count or tensor-parallel degree."""
    written = Layout(
        written_by(checkpoint),
        written_tensor_degree(checkpoint),
        written_sequence_degree(checkpoint),
        written_expert_degree(checkpoint),
    )
    if written == now:
        return
    if written.data != now.data and not streamed:
        log.warning(
            "resume: checkpoint written by %s, continuing on %s: the epoch's unseen sequences are re-planned "
            "for %d data-parallel rank(s) (none skipped or repeated); a step now covers %d rank(s) x %d "
            "micro-batch(es)",
            written.describe(),
            now.describe(),
            now.data,
            now.data,
            accumulation,
        )
    elif written.tensor != now.tensor or written.expert != now.expert:
        log.info(
            "resume: checkpoint written by %s, continuing on %s: the weights and optimizer states are re-split "
            "from the universal checkpoint; the batches are the same",
            written.describe(),
            now.describe(),
        )


def rank_state(train_stream) -> dict | None:
    """The part of the stream's position that is this rank's own (lmscale.rollouts.stream), if any."""
    own = getattr(train_stream, "rank_state_dict", None)
    return own() if own is not None else None


class CheckpointSaver:
    """The loop's save hooks: an atomic checkpoint with the data position and the best eval loss so far,
    written before `save` returns, or in the background (checkpoint.async) and completed by `settle`."""

    def __init__(self, engine, train_stream, run: Run, unfreezing: Unfreezing) -> None:
        self.engine, self.train_stream, self.run, self.unfreezing = engine, train_stream, run, unfreezing
        settings = run.config.checkpoint
        self.background = (
            AsyncCheckpoints(engine, run.dir.root, settings.keep_last) if settings.async_save else None
        )
        self.mirror = None
        if settings.mirror and run.is_rank_zero:
            self.mirror = CheckpointMirror(
                settings.mirror, settings.mirror_options, run.dir, settings.keep_last
            )

    def save(self, point: SavePoint) -> Path:
        config = self.run.config
        position = self.train_stream.state_dict()
        # Streamed shards differ per rank, and so do an online method's rows kept for its next steps.
        own = position if config.data.streaming else rank_state(self.train_stream)
        state = TrainingState(point.step, point.tokens_seen, position, point.best_eval_loss, own)
        adapters_only = config.finetune.lora is not None
        mark = partial(self.completed, point)
        # A layer not yet unfrozen is still part of the checkpoint.
        with self.unfreezing.everything_trainable():
            if self.background is not None:
                return self.background.save(state, adapters_only, config.parallel.sequence, mark)
            path = save_checkpoint(
                self.engine,
                self.run.dir.root,
                state,
                config.checkpoint.keep_last,
                adapters_only,
                config.parallel.sequence,
            )
        mark()
        return path

    def completed(self, point: SavePoint) -> None:
        """Rank 0, once the checkpoint of `point` is complete: mark it the best, and mirror it."""
        if not self.run.is_rank_zero:
            return
        if point.is_best:
            mark_best(self.run.dir.root, point.step)
        if self.mirror is not None:
            self.mirror.upload(self.run.dir.checkpoints / checkpoint_tag(point.step))

    def settle(self, wait: bool) -> Path | None:
        """Complete a checkpoint written in the background once every rank's files are durable; with `wait`,
        also wait for the mirror's uploads (the end of the run)."""
        completed = self.background.settle(wait) if self.background is not None else None
        if wait and self.mirror is not None:
            self.mirror.wait()
        return completed
