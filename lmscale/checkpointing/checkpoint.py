"""Atomic, resumable DeepSpeed checkpoints under `<output_dir>/checkpoints/`.

A checkpoint counts only when complete: every rank writes into `<tag>.partial/`, all ranks wait for
each other, then rank 0 syncs the files, renames the directory to `<tag>/`, writes a `COMPLETE`
marker, and moves the `latest` pointer last. A crash at any moment leaves either the previous
checkpoint as the newest complete one, or a `.partial` directory that is skipped with a warning.

Next to DeepSpeed's own files (model, optimizer and scheduler state, ZeRO shards), each rank saves its
RNG states in `rng_rank<R>.pt`, loaded back with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from filelock import FileLock

from lmscale import faults
from lmscale.atomic import fsync_directory, write_atomically
from lmscale.checkpointing.manifest import (
    checkpoint_damage,
    file_checksums,
    verify_checkpoint,
    written_by,
    written_expert_degree,
    written_folded,
    written_tensor_degree,
)
from lmscale.checkpointing.rundir import RunDir
from lmscale.checkpointing.training_state import TrainingState
from lmscale.errors import ConfigError, LmscaleError
from lmscale.parallel.autoep import universal_form_loads_into_folding
from lmscale.parallel.engine import any_rank, cpu_group

log = logging.getLogger(__name__)

UNIVERSAL = "universal"  # DeepSpeed's rank-count-independent form of a checkpoint, made on demand
# The optimizers whose states DeepSpeed's universal conversion can re-split: it reads every parameter's
# `exp_avg` and `exp_avg_sq` (ds_to_universal.py, 0.19.8), a KeyError for SGD's, Lion's, Adafactor's and Muon's.
UNIVERSAL_OPTIMIZERS = ("adamw", "lamb")
UNIVERSAL_INFO = "universal_checkpoint_info"  # client-state key ds_to_universal requires (DeepSpeed's name)
TAG_PATTERN = re.compile(r"^step_(\d{8})$")
DELETING = ".deleting"  # a pruned checkpoint moved aside while a thread deletes it


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
    fsync_directory(directory)


# A checkpoint's own copy of config.yaml: a later start that changes a resumable key (train.max_steps)
# rewrites the run's config.yaml, never what an older checkpoint was written with.
CHECKPOINT_CONFIG = "config.yaml"


def save_checkpoint(
    engine: Any,
    output_dir: Path,
    state: TrainingState,
    keep_last: int,
    adapters_only: bool = False,
    sequence: int | None = None,
) -> Path:
    """Save on every rank (DeepSpeed writes each rank's ZeRO shard), atomically; returns the checkpoint dir.
    `sequence` is the job's sequence-parallel degree, recorded for resumes (default: the engine's, which
    DeepSpeed reports as 1 when AutoTP is on too).

    DeepSpeed keeps only rank 0's client state, so a rank's own data position (streamed shards) goes into
    `data_rank<R>.json`. `adapters_only` (LoRA) leaves the frozen base weights out: they are rebuilt from
    model.path. A write that fails on any rank (a full disk) removes the partial checkpoint on every rank
    and raises, naming the newest intact one.
    """
    directory = RunDir(output_dir).checkpoints
    partial = directory / f"{checkpoint_tag(state.step)}.partial"
    failure = write_partial(engine, partial, state, adapters_only)
    if any_rank(failure is not None):  # also the barrier: every rank has written its files
        abandon_partial(partial, dist.get_rank(), state.step, directory, failure)
    checksums = file_checksums(partial, dist.get_rank(), dist.get_world_size())
    if dist.get_rank() == 0:
        complete_checkpoint(partial, job_meta(engine, state.step, sequence), checksums, keep_last)
    dist.barrier()
    return directory / checkpoint_tag(state.step)


def job_meta(engine: Any, step: int, sequence: int | None) -> dict[str, Any]:
    """What the manifest records of the job that wrote a checkpoint (for resumes on another layout)."""
    autoep = autoep_degree_of(engine)
    return {
        "step": step,
        "world_size": dist.get_world_size(),
        "tensor": tensor_degree(engine),
        "sequence": sequence or int(getattr(engine, "sequence_parallel_size", 1)),
        "expert": autoep or 1,
        "autoep": autoep is not None,
    }


class DirectFiles:
    """lmscale's own files of a checkpoint written in place, before the save returns (the default)."""

    def save_object(self, obj: Any, path: Path) -> None:
        torch.save(obj, path)

    def write_bytes(self, path: Path, data: bytes) -> None:
        path.write_bytes(data)

    def finish(self, step: int, rank: int) -> None:
        faults.while_saving(step, rank)  # the fault tests' point: every file written, none complete


def write_partial(
    engine: Any, partial: Path, state: TrainingState, adapters_only: bool, files: Any = None
) -> OSError | None:
    """This rank's files of the checkpoint in `partial` (lmscale's own through `files`: DirectFiles, or
    the background writer's); returns the write failure, if any, for all ranks to agree on."""
    files = files or DirectFiles()
    rank = dist.get_rank()
    client_state = state.client_state()
    # universal_checkpoint_info lets `deepspeed.checkpoint.ds_to_universal` convert this checkpoint
    # for a different number of ranks later; without it the conversion refuses. AutoTP records its own
    # (how each weight is split), and so does AutoEP (where each expert lives), which the client state must
    # not overwrite (DeepSpeed refuses it then).
    if getattr(engine.module, UNIVERSAL_INFO, None) is None and not getattr(engine, "has_moe_layers", False):
        client_state[UNIVERSAL_INFO] = {"universal_checkpoint_version": 0.2}
    try:
        engine.save_checkpoint(
            str(partial.parent),
            tag=partial.name,
            client_state=client_state,
            save_latest=False,
            exclude_frozen_parameters=adapters_only,
        )
        files.save_object(rng_state(), partial / f"rng_rank{rank}.pt")
        if state.rank_data_position is not None:
            own = json.dumps(state.rank_data_position).encode("utf-8")
            files.write_bytes(partial / f"data_rank{rank}.json", own)
        run_config = RunDir(partial.parent.parent).config
        if rank == 0 and run_config.is_file():  # the config this checkpoint was trained with, kept with it
            files.write_bytes(partial / CHECKPOINT_CONFIG, run_config.read_bytes())
        files.finish(state.step, rank)
    except OSError as exc:
        return exc
    except RuntimeError as exc:
        return torch_write_failure(exc, partial)
    return None


def complete_checkpoint(
    partial: Path,
    meta: dict[str, Any],
    checksums: list[tuple[str, str]],
    keep_last: int,
    files_synced: bool = False,
    prune_in_background: bool = False,
) -> None:
    """Rank 0: sync the files (unless their writers did: `files_synced`), rename `<tag>.partial` to `<tag>`,
    write its manifest (the COMPLETE marker), move `latest` last, and prune the old ones (deleting them in a
    thread with `prune_in_background`)."""
    directory = partial.parent
    final = directory / partial.name.removesuffix(".partial")
    if final.exists():  # a checkpoint of the same step from an earlier attempt
        shutil.rmtree(final)
    if not files_synced:
        _fsync_tree(partial)
    os.replace(partial, final)
    # The manifest lets a resume notice a file damaged after the fact (truncated, or bits changed).
    files = {name: {"bytes": (final / name).stat().st_size, "blake2b": digest} for name, digest in checksums}
    write_atomically(RunDir.complete_marker(final), json.dumps({**meta, "files": files}) + "\n")
    write_atomically(RunDir(directory.parent).latest, final.name)  # the pointer moves last
    prune_checkpoints(directory, keep_last, in_background=prune_in_background)


# torch.save reports a failed write from its C++ zip writer as a RuntimeError, not an OSError.
TORCH_WRITE_FAILURES = ("PytorchStreamWriter", "inline_container.cc", "file write failed")


def torch_write_failure(exc: RuntimeError, partial: Path) -> OSError:
    """The OSError behind torch.save's RuntimeError: ENOSPC when the disk is (nearly) full, else EIO.
    Any other RuntimeError is not a write failure, and is raised again."""
    if not any(marker in str(exc) for marker in TORCH_WRITE_FAILURES):
        raise exc
    full = shutil.disk_usage(partial.parent).free < 1 << 20
    code = errno.ENOSPC if full else errno.EIO
    return OSError(code, os.strerror(code), str(partial))


def abandon_partial(partial: Path, rank: int, step: int, directory: Path, failure: OSError | None) -> None:
    """A failed save: remove what was written (rank 0, once all have stopped writing) and say what is intact."""
    dist.barrier(group=cpu_group())
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier(group=cpu_group())
    intact = complete_checkpoints(directory)
    kept = (
        f"the checkpoint of step {checkpoint_step(intact[-1])} is intact"
        if intact
        else "no checkpoint is kept"
    )
    if failure is not None and failure.errno == errno.ENOSPC:
        reason = f"no space left on {directory}"
    elif failure is not None:
        reason = f"{failure.strerror or failure} writing to {directory}"
    else:
        reason = f"another rank could not write to {directory}"
    raise LmscaleError(
        f"{reason} while saving step {step}; {kept}: free space (or fix the filesystem) and run the same "
        "command again to resume from it"
    )


def checkpoint_step(checkpoint: Path) -> int:
    return int(TAG_PATTERN.match(checkpoint.name).group(1))


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first; partial ones are reported and skipped."""
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.iterdir()):
        if path.is_dir() and TAG_PATTERN.match(path.name) and RunDir.complete_marker(path).is_file():
            found.append(path)
        elif path.is_dir() and (path.name.endswith(".partial") or TAG_PATTERN.match(path.name)):
            log.warning("checkpoint: skipping incomplete %s (the run stopped while writing it)", path)
    return found


def prune_checkpoints(directory: Path, keep_last: int, in_background: bool = False) -> None:
    """Keep the newest `keep_last` complete checkpoints and the best one (by eval loss), if marked.
    `in_background`: move the others aside at once and delete them in a thread (a checkpoint of hundreds of
    GB takes a while to delete, time a background save would otherwise spend on the training path)."""
    checkpoints = complete_checkpoints(directory)
    best = RunDir(directory.parent).best_tag()
    doomed = [path for path in checkpoints[:-keep_last] if path.name != best]
    doomed += [*directory.glob("*.partial"), *directory.glob(f"*{DELETING}")]  # earlier attempts' leftovers
    for path in doomed:
        if not in_background:
            shutil.rmtree(path, ignore_errors=True)
            continue
        aside = path if path.name.endswith(DELETING) else path.with_name(path.name + DELETING)
        os.replace(path, aside)  # no longer a checkpoint (nor a partial one) from this moment
        threading.Thread(
            target=shutil.rmtree, args=(aside,), kwargs={"ignore_errors": True}, daemon=True
        ).start()


def mark_best(output_dir: Path, step: int) -> None:
    """Record the checkpoint of `step` as the best so far by eval loss (rank 0)."""
    write_atomically(RunDir(output_dir).best, checkpoint_tag(step))


def newest_intact(checkpoints: list[Path]) -> Path | None:
    """The newest checkpoint whose files match its manifest; a damaged newer one is named in a warning."""
    for checkpoint in reversed(checkpoints):
        damage = checkpoint_damage(checkpoint)
        if damage is None:
            return checkpoint
        older = [c for c in checkpoints if c.name < checkpoint.name]
        if not older:
            raise LmscaleError(
                f"checkpoint {checkpoint} is damaged ({damage}) and no older one is intact: restore it, or "
                "pass --force to start the run over"
            )
        log.warning("resume: checkpoint %s is damaged (%s); trying %s", checkpoint, damage, older[-1].name)
    return None


def find_resume_checkpoint(output_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: `auto` = newest intact one in the run dir (a damaged newer one is
    skipped with a warning); `none`; or a path (which must be intact)."""
    if resume == "none":
        return None
    if resume == "auto":
        return newest_intact(complete_checkpoints(RunDir(output_dir).checkpoints))
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(
            f"checkpoint.resume={resume} does not exist: give a checkpoint directory, or use auto"
        )
    if not RunDir.complete_marker(path).is_file():
        raise ConfigError(
            f"checkpoint.resume={resume} is not a complete lmscale checkpoint (no {RunDir.complete_marker(path).name} "
            "marker): pick another"
        )
    return verify_checkpoint(path)


def tensor_degree(engine: Any) -> int:
    """The engine's AutoTP degree (1 without tensor parallelism; DeepSpeed says 0 then)."""
    return max(1, int(engine.autotp_size())) if hasattr(engine, "autotp_size") else 1


def autoep_degree_of(engine: Any) -> int | None:
    """The engine's AutoEP degree, or None unless AutoEP replaced the MoE layers (which it also does at 1)."""
    section = getattr(getattr(engine, "_config", None), "expert_parallel_config", None)
    on = section is not None and section.enabled and getattr(engine, "has_moe_layers", False)
    return int(section.autoep_size) if on else None


def _conversion_command(checkpoint: Path, output: Path) -> list[str]:
    # DeepSpeed's conversion cannot read a folded checkpoint's experts: lmscale runs it with those steps replaced
    converter = (
        "lmscale.checkpointing.folded_universal"
        if written_folded(checkpoint)
        else "deepspeed.checkpoint.ds_to_universal"
    )
    return [
        sys.executable,
        "-m",
        converter,
        "--input_folder",
        str(checkpoint),
        "--output_folder",
        str(output),
    ]


def ensure_universal(checkpoint: Path, world_size: int) -> Path:
    """Convert `checkpoint` to DeepSpeed's universal form once (any rank may call; one converts).

    The universal form holds every parameter's fp32 weights and optimizer moments whole, so a job with
    a different number of ranks can re-partition them. It is written beside the original, atomically.
    """
    target = checkpoint / UNIVERSAL
    with FileLock(str(checkpoint / f"{UNIVERSAL}.lock")):
        if target.is_dir():
            return target
        log.info(
            "checkpoint: converting %s (written by %d ranks) to a universal checkpoint (once; kept beside it)",
            checkpoint,
            written_by(checkpoint),
        )
        partial = checkpoint / f"{UNIVERSAL}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        result = subprocess.run(
            _conversion_command(checkpoint, partial), capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
            raise LmscaleError(
                f"{checkpoint} (written by {written_by(checkpoint)} ranks) could not be converted for "
                f"{world_size} rank(s): {last}; resume it on {written_by(checkpoint)} ranks, or convert it "
                f"yourself: python {' '.join(_conversion_command(checkpoint, target)[1:])}"
            )
        os.replace(partial, target)
    return target


def needs_universal(
    checkpoint: Path, world_size: int, zero_stage: int, tensor: int = 1, expert: int = 1
) -> bool:
    """Partitioned (ZeRO 1-3) states written by another rank count or tensor-parallel degree must be
    re-partitioned; so must experts split another way (each rank's file holds its experts' moments)."""
    moved = written_by(checkpoint) != world_size or written_tensor_degree(checkpoint) != tensor
    return zero_stage > 0 and (moved or written_expert_degree(checkpoint) != expert)


def load_checkpoint(
    engine: Any, checkpoint: Path, seed: int, universal: bool, adapters_only: bool = False
) -> TrainingState:
    """Restore model, optimizer, scheduler and RNG; returns where training stood.

    On the rank count that wrote it, everything comes back exactly. On another rank count (elastic
    resume) ZeRO 1-3 weights and optimizer states come from the universal form (`universal`, see
    `ensure_universal` and `"load_universal"` in the DeepSpeed config; ZeRO-0 states are whole and
    load as they are), and each rank's RNG is seeded anew from (seed, step, rank): the old ranks'
    random streams have no counterpart on the new ones.
    """
    elastic = universal or written_by(checkpoint) != dist.get_world_size()
    directory, tag = (checkpoint, UNIVERSAL) if universal else (checkpoint.parent, checkpoint.name)
    loading = universal_form_loads_into_folding() if universal else contextlib.nullcontext()
    try:
        # An adapters-only checkpoint (LoRA) has no frozen base weights: the model already holds them.
        with loading:
            _, client_state = engine.load_checkpoint(
                str(directory), tag=tag, load_module_strict=not adapters_only
            )
    except Exception as exc:  # torch/pickle/DeepSpeed raise many types for a damaged or foreign checkpoint
        raise LmscaleError(
            f"{checkpoint} does not fit this model ({type(exc).__name__}): resume with the config it was trained with"
        ) from None
    if client_state is None:
        raise LmscaleError(
            f"{checkpoint} could not be read: it is damaged; remove it to resume from an older one"
        )
    if universal:
        restore_buffers(engine.module, checkpoint / UNIVERSAL)
        if engine.zero_optimization_stage() == 3:
            mend_zero3_universal_optimizer(engine.optimizer.optimizer, checkpoint / UNIVERSAL)
    if elastic:
        reseed(seed, client_state["step"], dist.get_rank())
        return TrainingState.from_client_state(client_state)
    set_rng_state(torch.load(checkpoint / f"rng_rank{dist.get_rank()}.pt", weights_only=True))
    own_data = checkpoint / f"data_rank{dist.get_rank()}.json"
    own = json.loads(own_data.read_text(encoding="utf-8")) if own_data.is_file() else None
    return TrainingState.from_client_state(client_state, own)


def restore_buffers(module: torch.nn.Module, universal: Path) -> None:
    """The persistent buffers a universal checkpoint's model states hold, back into `module`.

    Why: DeepSpeed 0.19.8 restores a universal checkpoint's parameters from its zero/ directory and skips the
    module's state dict altogether (engine._load_checkpoint), so every buffer stays as the model was built:
    DeepSeek-V3's routing bias, trained by model.router_bias_update, would start over after an N->M resume."""
    states = universal_model_states(universal)
    saved = states.get("module") or {}
    own = dict(module.named_buffers())
    for name in states.get("buffer_names") or []:
        if name in saved and name in own:
            own[name].copy_(saved[name])


def mend_zero3_universal_optimizer(optimizer: torch.optim.Optimizer, universal: Path) -> None:
    """Put right two things DeepSpeed 0.19.8's ZeRO-3 universal load gets wrong (`stage3.py`,
    `load_hp_checkpoint_state_from_checkpoint_dir_stage3`), in the torch optimizer ZeRO-3 steps.

    - Every parameter group's state gets the same `step` tensor, which the optimizer then advances once per
      group and step: with lmscale's 2-3 groups, Adam's bias correction ran 2-3 steps per step after the move
      (the losses left an unmoved run's by 1e-4 from the second step on). Each state gets its own step.
    - Every group gets the hyperparameters of the first group, which is lmscale's no-decay group: weight decay
      was off for every weight after the move. Each group gets back those it was saved with (its `name`, which
      says its expert split, stays the new layout's). A config that groups the parameters another way (another
      optim.layer_lr_decay, optimizer or gradual unfreezing) is refused.
    """
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    saved = torch.load(universal / "zero" / "optimizer_state.pt", weights_only=False, map_location="cpu")
    saved_groups = saved["optimizer_state_dict"]["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        # Nothing to match them by, and the LR schedule's per-group state would not match either; a resume on
        # the same rank count refuses it too (torch: "a different number of parameter groups").
        raise LmscaleError(
            f"{universal.parent} was saved with {len(saved_groups)} optimizer parameter groups and this config "
            f"makes {len(optimizer.param_groups)}: resume with the run's optim.* and finetune.unfreeze settings"
        )
    for group, saved_group in zip(optimizer.param_groups, saved_groups, strict=True):
        group.update({key: value for key, value in saved_group.items() if key not in ("params", "name")})


def universal_model_states(universal: Path) -> dict:
    """The model states DeepSpeed's conversion copies beside the parameters (rank 0's), or {} if none.

    Memory-mapped: under ZeRO 1-2 the file holds every weight of the model, and its readers here (every rank at
    a universal resume, the export) take only the buffers and the recorded shapes."""
    files = sorted(universal.glob("*model_states.pt"))
    return torch.load(files[0], weights_only=False, map_location="cpu", mmap=True) if files else {}


def reseed(seed: int, step: int, rank: int) -> None:
    """Fresh, reproducible RNG streams for a rank with no saved state of its own."""
    derived = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)
