"""One rank of a training job: config -> data -> model -> engine -> loop -> checkpoint.

`lmscale train` runs this in-process (debug mode); the `deepspeed` launcher starts it once per rank
through `launcher/train.py` (or `python -m lmscale.training.worker`).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from functools import partial
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from lmscale.checkpointing.checkpoint import checkpoint_step
from lmscale.checkpointing.manifest import written_by
from lmscale.checkpointing.rundir import mark_finished, write_labels, write_run_files
from lmscale.checkpointing.runlock import RunLock
from lmscale.config import Config
from lmscale.data.pipeline import PreparedData, prepare_data
from lmscale.errors import ConfigError, LmscaleError, is_write_failure, write_failure_line
from lmscale.fast_exit import skip_final_collection
from lmscale.methods import method_for
from lmscale.model.build import build_model, describe_parameters
from lmscale.model.compiling import compile_model, compile_seconds, compiled_graphs
from lmscale.model.finetune import Unfreezing, all_joined_step, is_joined
from lmscale.model.kernels import describe_fused
from lmscale.model.router_balance import check_routing_bias, keep_routing_bias_in_fp32
from lmscale.objectives.fused_head import fused_head_problem, install_fused_head
from lmscale.parallel import engine as ds_engine
from lmscale.parallel import flight_recorder
from lmscale.parallel.autoep import autoep_degree
from lmscale.parallel.engine import select_accelerator
from lmscale.parallel.layout import model_split_problems
from lmscale.parallel.ulysses import register_ulysses
from lmscale.planning.budget import auto_token_budget
from lmscale.reporting.sink import MetricsSink, configure_console, log
from lmscale.runs.run import Run, StartChecks, open_run
from lmscale.training.closing import finish
from lmscale.training.loop import LoopStart, Streams, train
from lmscale.training.loop_hooks import loop_hooks
from lmscale.training.online import OnlineTraining
from lmscale.training.optim import build_optimizer, group_depths, num_layers_of, params_by_depth
from lmscale.training.reference import attach_reference
from lmscale.training.replicas import check_replicas_agree
from lmscale.training.resume import Resume, plan_resume, resume_point
from lmscale.training.schedules import build_scheduler
from lmscale.training.signals import StopRequest
from lmscale.training.stopping import EARLY_STOP
from lmscale.training.streams import batch_streams, check_packing_support, settle_training_length
from lmscale.training.watchdog import HangWatchdog


def run(config_path: str | None, overrides: list[str], force: bool = False) -> None:
    """Train one rank of the job described by the config and the launcher's environment."""
    run = open_rank_run(config_path, overrides, force)
    resume = plan_resume(run)
    say_elastic_restart(run, resume.checkpoint)
    if already_done(resume.checkpoint, run):
        return
    run = run.with_ds_config(resume.apply_to(run.ds_config))
    data = prepare_rank_data(run)
    # Every rank has its data now: nothing slow happens inside a collective.
    flight_recorder.switch_on(run.dir.nccl_dump_prefix)  # read when the process group is made
    ds_engine.init_distributed(run.config.train.hang_timeout_s)
    torch.distributed.barrier()  # every rank has checked the run dir before rank 0 writes to it
    ds_engine.release_shared_memory_names()  # every rank has mapped every buffer by now
    model = build_rank_model(run, data)
    streams = None  # an online method samples its batches with the engine (train_in_run_dir)
    if not method_for(run.config.finetune).online:
        run = settle_token_budget(run, model)
        check_packing_support(run.config)
        streams = batch_streams(run, data)
        run = settle_training_length(run, streams.train)
    engine, unfreezing = training_engine(run, model)
    # An online method's reward functions are tried here, before the run directory is written.
    online = OnlineTraining(run, data, engine) if method_for(run.config.finetune).online else None
    train_in_run_dir(run, data, engine, streams, unfreezing, resume, online)
    ds_engine.shutdown_distributed()


def say_elastic_restart(run: Run, checkpoint: Path | None) -> None:
    """Under torchrun's elastic agent, a restart says so: why, where it goes on from, on how many ranks."""
    restart = ds_engine.elastic_restart()
    if restart is None or not run.is_rank_zero:
        return
    where = f"from {checkpoint}" if checkpoint is not None else "from the start (no complete checkpoint yet)"
    before, now = (written_by(checkpoint) if checkpoint is not None else run.world_size), run.world_size
    change = f"the job had {before} rank(s), it has {now} now; " if before != now else ""
    # The agent counts failures only; a node that joins restarts the ranks without a count (and a node that
    # joined later counts from 0), so more ranks than the checkpoint's writers is the sign of a join.
    if now > before:
        log.warning("elastic restart: node(s) joined; %sgoing on %s", change, where)
    elif restart:
        log.warning(
            "elastic restart %d: torchrun restarted the job after a failure (its log above names the rank); "
            "%sgoing on %s with %d rank(s)",
            restart,
            change,
            where,
            now,
        )


def open_rank_run(config_path: str | None, overrides: list[str], force: bool) -> Run:
    """This rank's run: the accelerator chosen, the console set up, the run opened (the one place a rank
    reads its ranks from the launcher's environment)."""
    select_accelerator()  # before anything imports deepspeed
    if "WORLD_SIZE" not in os.environ:
        ds_engine.set_single_process_env()
    rank = ds_engine.rank()
    configure_console(rank == 0)
    threads = ds_engine.share_cpu_cores()
    if threads:
        log.info("cpu: %s", threads)
    world_size = int(os.environ["WORLD_SIZE"])
    return open_run(
        config_path,
        overrides,
        world_size,
        ds_engine.has_gpu(),
        rank=rank,
        local_rank=ds_engine.local_rank(),
        force=force,
        checks=StartChecks.DIRECTORY,  # plan_resume finds and verifies the checkpoint
    )


def already_done(checkpoint: Path | None, run: Run) -> bool:
    """A run whose newest checkpoint is at train.max_steps has nothing left to train: say so at once, before
    data, model, engine or W&B are touched (every rank decides the same from the same files)."""
    steps = run.config.train.max_steps
    if checkpoint is None or steps is None or checkpoint_step(checkpoint) < steps:
        return False
    if run.is_rank_zero:
        mark_finished(run.dir.root, checkpoint_step(checkpoint), "reached train.max_steps")
        print(
            f"nothing to do: the run in {run.dir.root} already reached step {checkpoint_step(checkpoint)} "
            f"(train.max_steps={steps}); raise train.max_steps to train it further"
        )
    return True


def prepare_rank_data(run: Run) -> PreparedData:
    config = run.config
    return prepare_data(
        config.data,
        config.model.path,
        run.data_rank,
        run.layout.data,
        config.model.trust_remote_code,
        config.finetune.task,
        config.finetune.num_labels,
        completion_room=config.finetune.grpo.max_new_tokens if config.data.format == "prompt" else 0,
    )


def build_rank_model(run: Run, data: PreparedData) -> torch.nn.Module:
    """The model, checked against the tensor/sequence layout, and described in one line."""
    config = run.config
    model = build_model(
        config.model, data.tokenizer, config.data.max_seq_len, config.seed, config.finetune, data.labels
    )
    problems = model_split_problems(model, run.layout)
    if problems:
        raise ConfigError("; ".join(problems))
    check_routing_bias(model, config.model.router_bias_update)
    log.info(
        "model: %s, %s, %s; %s, ZeRO-%d, %s",
        config.model.path or config.model.preset,
        describe_parameters(model),
        describe_fused(model),
        run.layout.describe(),
        config.zero.stage,
        config.precision,
    )
    return model


def settle_token_budget(run: Run, model: torch.nn.Module) -> Run:
    """data.max_tokens_per_batch=auto as the largest budget this model fits (a new Run)."""
    if run.config.data.max_tokens_per_batch != "auto":
        return run
    budget = auto_token_budget(run.config, model, run.world_size)
    return run.settled("data", max_tokens_per_batch=budget)


def optimization(model: torch.nn.Module, config: Config, expert: int | None = None):
    """Optimizer, LR schedule and unfreezing schedule; every parameter group exists before
    `deepspeed.initialize`, and gradual unfreezing gates each depth's group (see lmscale.model.finetune)."""
    unfreeze = config.finetune.unfreeze
    by_depth = unfreeze is not None
    optimizer = build_optimizer(model, config.optim, config.zero.offload == "cpu", by_depth, expert)
    num_layers = num_layers_of(model)
    gates = None
    if by_depth:
        depths = group_depths(model, config.optim, by_depth, expert)
        gates = [partial(is_joined, depth, num_layers=num_layers, unfreeze=unfreeze) for depth in depths]
        log.info(
            "unfreeze: from the %s, one layer every %d steps; all %d layers train from step %d",
            unfreeze.start_from,
            unfreeze.every_steps,
            num_layers,
            all_joined_step(num_layers, unfreeze) + 1,
        )
    unfreezing = Unfreezing(params_by_depth(model), num_layers, unfreeze)
    return optimizer, build_scheduler(optimizer, config, gates), unfreezing


def training_engine(run: Run, model: torch.nn.Module):
    """(the DeepSpeed engine with optimizer and schedule, the unfreezing schedule)."""
    config = run.config
    optimizer, scheduler, unfreezing = optimization(model, config, autoep_degree(run.ds_config))
    mpu = register_ulysses(model, run.layout) if run.layout.sequence > 1 else None
    engine = ds_engine.build_engine(model, optimizer, scheduler, run.ds_config, mpu)
    if config.model.router_bias_update:
        keep_routing_bias_in_fp32(engine.module)
    if config.train.chunked_loss:
        set_up_chunked_loss(engine.module, method_for(config.finetune).class_head)
    if config.model.compile:
        compile_model(engine)
    return engine, unfreezing


def set_up_chunked_loss(model: torch.nn.Module, class_head: bool) -> None:
    """Fuse the output layer into the loss where the family allows it, else the blockwise loss; says which."""
    problem = "classification heads are small" if class_head else fused_head_problem(model)
    if problem is None:
        install_fused_head(model)
        log.info("chunked loss: output layer fused into the loss (the logits never exist whole)")
    else:
        log.info("chunked loss: blockwise over the logits, no fp32 copy (not fused: %s)", problem)


def train_in_run_dir(
    run: Run,
    data: PreparedData,
    engine,
    streams: Streams | None,
    unfreezing: Unfreezing,
    resume: Resume,
    online: OnlineTraining | None = None,
) -> None:
    """Lock and write the run directory, then train, with the hang watchdog running."""
    lock = RunLock(run.dir.root)
    watchdog = HangWatchdog(run.dir.root, run.rank, run.config.train.hang_timeout_s, on_tick=lock.touch)
    try:
        # Written only now: a model, optimizer or DeepSpeed set-up that fails leaves no run directory behind.
        if run.is_rank_zero:
            lock.acquire()
            write_run_files(run.config, run.ds_config, run.dir.root, run.force)
            data.tokenizer.save_pretrained(str(run.dir.tokenizer))
            write_labels(run.dir.root, data.labels)
        watchdog.start()
        method = method_for(run.config.finetune)
        if method.needs_reference:
            attach_reference(run, data, engine, resume.checkpoint is not None, watchdog)
            streams = batch_streams(run, data)
        if online is not None:
            streams = online.streams()
        start = resume_point(engine, streams.train, run, resume)
        train_and_finish(run, engine, streams, unfreezing, start, watchdog, data.tokenizer, online)
    finally:
        watchdog.stop()
        lock.release()


def train_and_finish(
    run: Run,
    engine,
    streams: Streams,
    unfreezing: Unfreezing,
    start: LoopStart,
    watchdog,
    tokenizer,
    online: OnlineTraining | None = None,
) -> None:
    """The training loop with its hooks, the replica check, and the closing summary."""
    config = run.config
    stop = StopRequest()
    stop.install()
    hooks = loop_hooks(run, engine, streams.train, unfreezing, watchdog, tokenizer, stop, online)
    sink = MetricsSink(
        config, run.dir, config.train.max_steps, enabled=run.is_rank_zero, initial_step=start.step
    )
    result = train(engine, streams, run, sink, hooks, start)
    if config.model.compile:
        log.info("compile: %d graph(s), %.1f s compiling in all", compiled_graphs(), compile_seconds())
    digest = check_replicas_agree(engine, config.zero.stage, run.layout)
    if digest:
        layout = run.layout
        experts = "" if layout.expert == 1 else f" (each expert's on its {layout.expert_copies})"
        log.info(
            "parameters identical on all %d data-parallel replicas%s (sha256 %s)",
            layout.data,
            experts,
            digest[:16],
        )
    if result.stopped_by and result.stopped_by != EARLY_STOP:
        result.stopped_by = stop.signal_name
    finish(result, sink, run, start)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="One rank of an lmscale training job (started by a launcher)."
    )
    parser.add_argument("--config", help="YAML recipe; defaults to the embedded tiny CPU recipe")
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing run in output_dir")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for lmscale errors")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=3e-4")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    skip_final_collection()
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        run(args.config, args.overrides, force=args.force)
    except LmscaleError as exc:
        if args.debug:
            raise
        report(exc)
        return exc.exit_code
    except RuntimeError as exc:
        line = None if args.debug else failed_job_line(exc)
        if line is None:
            raise
        tqdm.write(f"lmscale: error: {line}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk or a read-only place, met after the start-up checks
        if args.debug or not is_write_failure(exc):
            raise
        tqdm.write(f"lmscale: error: {write_failure_line(exc)}", file=sys.stderr)
        return 1
    return 0


def report(exc: LmscaleError) -> None:
    """Say the error, or leave it to this node's first rank and wait until that rank has exited."""
    if says_the_error(exc):
        tqdm.write(f"lmscale: error: {exc}", file=sys.stderr)  # clears an open progress bar line first
    else:
        wait_for_first_rank()


def wait_for_first_rank(timeout_s: float = 30.0) -> None:
    """Wait (at most `timeout_s`) until this job's first rank on this node has exited.

    Why: a launcher ends every rank as soon as one exits with an error. A rank that left a refusal to the first
    rank and exited at once could have that rank ended before it said it (DeepSpeed's per-node launcher, as
    lmscale runs it, looks at its ranks every 50 ms): the job would stop without a word. The first rank is
    the sibling process of the same job (same MASTER_PORT) with LOCAL_RANK 0; outside a launcher there is none.
    """
    port = os.environ.get("MASTER_PORT")
    parent = psutil.Process().parent()
    if port is None or parent is None:
        return
    first = []
    for sibling in parent.children():
        try:
            environment = sibling.environ()
        except psutil.Error:
            continue
        if environment.get("LOCAL_RANK") == "0" and environment.get("MASTER_PORT") == port:
            first.append(sibling)
    psutil.wait_procs(first, timeout=timeout_s)


def says_the_error(exc: LmscaleError) -> bool:
    """Whether this rank prints the error: a refused configuration is the same on every rank of a node (the
    same config and files), so its first rank says it once; any other error, the rank that met it."""
    return not isinstance(exc, ConfigError) or int(os.environ.get("LOCAL_RANK", "0")) == 0


def failed_job_line(exc: RuntimeError) -> str | None:
    """One line for the failures a job meets that are none of lmscale's doing: a rank or a data-loading worker
    gone. None for anything else (its traceback is the report)."""
    return lost_peer_line(exc) if is_lost_peer(exc) else lost_data_worker_line(exc)


# What gloo says when the process at the other end of a collective is gone.
LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def is_lost_peer(exc: RuntimeError) -> bool:
    return any(marker in str(exc) for marker in LOST_PEER)


# gloo names the peer it lost: "Connection closed by peer [10.0.0.2]:41234".
PEER_ADDRESS = re.compile(r"by peer \[([^\]]+)\]")


def lost_peer_line(exc: RuntimeError) -> str:
    detail = next(marker for marker in LOST_PEER if marker in str(exc))
    peer = PEER_ADDRESS.search(str(exc))
    if peer:
        detail += f" at {peer.group(1)}"
    return (
        f"rank {ds_engine.rank()} lost another rank of the job ({detail}): it died or its node is gone, see that "
        f"rank's messages above; {resume_advice()}"
    )


def resume_advice() -> str:
    """What happens next: under torchrun's elastic agent, with restarts left, it restarts the job itself."""
    restart, most = ds_engine.elastic_restart(), os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")
    if restart is not None and most.isdigit() and restart < int(most):
        return f"torchrun restarts the job from the last checkpoint (restart {restart + 1} of {most})"
    return "run the same command again to resume from the last checkpoint"


# torch's DataLoader when one of its worker processes is gone: "DataLoader worker (pid 123) is killed by
# signal: Killed.", "... exited unexpectedly with exit code 1.", "DataLoader worker (pid(s) 123) exited
# unexpectedly" (torch/csrc/DataLoader.cpp and torch/utils/data/dataloader.py, 2.x).
DATA_WORKER_DIED = re.compile(
    r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) (?:is killed by signal: ([^.]+)|exited unexpectedly)"
)


def lost_data_worker_line(exc: RuntimeError) -> str | None:
    """Why a rank's data-loading worker most likely died, and the fix (None: `exc` is not about one). Its workers
    (`data.num_workers`) are processes of their own: the host's out-of-memory killer picks them, and a full
    /dev/shm kills them with SIGBUS when they hand a batch over."""
    found = DATA_WORKER_DIED.search(str(exc))
    if found is None:
        return None
    pids, signal_name = found.group(1).strip(), found.group(2)
    if signal_name == "Killed":
        cause = (
            "was killed by SIGKILL, on a cluster most often the out-of-memory killer (see dmesg): give the job "
            "more host memory or lower data.num_workers (0 loads batches in the rank)"
        )
    elif signal_name == "Bus error":
        cause = (
            "was killed by SIGBUS: shared memory (/dev/shm) ran out while it handed a batch over: raise its size "
            "(a container's --shm-size) or set data.num_workers=0"
        )
    elif signal_name:
        cause = (
            f"was killed by signal {signal_name}: set data.num_workers=0 to meet the error in the rank itself"
        )
    else:
        # torch often cannot tell: a worker killed by SIGKILL is reported this way too.
        cause = (
            "exited unexpectedly (on a cluster most often the out-of-memory killer: see dmesg): give the job more "
            "host memory, or set data.num_workers=0 to load batches in the rank itself, where an error shows"
        )
    return f"rank {ds_engine.rank()}'s data-loading worker (pid {pids}) {cause}; then {resume_advice()}"


if __name__ == "__main__":
    sys.exit(main())
