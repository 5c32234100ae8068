"""One rank of a training job: config -> data -> model -> engine -> loop -> checkpoint.

`lmscale train` runs this in-process (debug mode); the `deepspeed` launcher starts it once per rank
through `launcher/train.py` (or `python -m lmscale.training.worker`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from pydantic import ValidationError
from tqdm import tqdm

from lmscale.checkpointing.checkpoint import checkpoint_step
from lmscale.checkpointing.rundir import (
    RunDir,
    mark_finished,
    write_labels,
    write_run_files,
)
from lmscale.checkpointing.runlock import RunLock
from lmscale.config import Config, TrainConfig
from lmscale.data import PreparedData, prepare_data
from lmscale.data.batches import BatchSettings, BatchStream, seq_len_cap
from lmscale.data.epoch import batch_line, step_figures, steps_to_train, stop_key
from lmscale.data.streaming import StreamingBatches, StreamSettings
from lmscale.errors import ConfigError, LmscaleError, is_write_failure, write_failure_line
from lmscale.evaluation.harness import flat_metrics, run_harness
from lmscale.methods import SFT, Method, method_for
from lmscale.model.build import build_model, describe_parameters
from lmscale.model.compiling import compile_model, compile_seconds, compiled_graphs
from lmscale.model.finetune import Unfreezing, all_joined_step, is_joined
from lmscale.model.kernels import describe_fused
from lmscale.objectives.dpo import load_reference, reference_logps, save_reference, with_reference
from lmscale.objectives.fused_head import fused_head_problem, install_fused_head
from lmscale.objectives.loss import perplexity
from lmscale.parallel import engine as ds_engine
from lmscale.parallel.engine import select_accelerator
from lmscale.parallel.layout import Layout, model_split_problems
from lmscale.parallel.ulysses import register_ulysses
from lmscale.planning.budget import auto_token_budget
from lmscale.reporting.sink import MetricsSink, configure_console, log
from lmscale.reporting.throughput import ThroughputModel, model_shape, peak_tflops
from lmscale.training.loop import (
    EARLY_STOP,
    LoopHooks,
    LoopStart,
    TrainResult,
    check_replicas_agree,
    train,
)
from lmscale.training.optim import build_optimizer, group_depths, num_layers_of, params_by_depth
from lmscale.training.preflight import resolve_run_config
from lmscale.training.resume import checkpoint_saver, plan_resume, resume_point
from lmscale.training.run_start import check_start
from lmscale.training.schedules import build_scheduler
from lmscale.training.signals import StopRequest
from lmscale.training.watchdog import HangWatchdog


def throughput_model(config: Config, model: torch.nn.Module) -> ThroughputModel:
    """FLOPs accounting for this model on this device (MFU/HFU only where a peak is known)."""
    device_name = torch.cuda.get_device_name() if ds_engine.has_gpu() else None
    peak = peak_tflops(device_name, config.metrics.peak_tflops)
    if peak is None:
        log.info("metrics: no peak TFLOP/s known for this device; set metrics.peak_tflops to log MFU/HFU")
    return ThroughputModel(
        model_shape(model.config),
        activation_checkpointing=config.model.activation_checkpointing,
        peak_tflops=peak,
    )


def check_packing_support(batching: str) -> None:
    """Say plainly when packed documents would attend to each other (older transformers)."""
    if batching != "pack":
        return
    import transformers.masking_utils as masking

    if hasattr(masking, "find_packed_sequence_indices"):
        log.info("data: packing with per-document position ids; documents attend only within themselves")
    else:
        log.warning(
            "data: this transformers version ignores packed position ids: packed documents attend across boundaries"
        )


def batch_settings(config: Config, layout: Layout | None = None, rank: int = 0) -> BatchSettings:
    """How `rank` batches its data; in a sequence-parallel layout, its slice of every row."""
    layout = layout or Layout()
    return BatchSettings(
        batching=config.data.batching,
        max_tokens_per_batch=config.data.max_tokens_per_batch,
        micro_batch_size=config.train.micro_batch_size,
        max_seq_len=config.data.max_seq_len,
        num_workers=config.data.num_workers,
        sequence_shard=(layout.sequence_rank(rank), layout.sequence),
    )


def fixed_stream(config: Config, sequences, pad_id: int, layout: Layout, rank: int) -> BatchStream:
    """Unshuffled batches of `sequences` in this rank's share, read in the main process (evaluation)."""
    settings = replace(batch_settings(config, layout, rank), num_workers=0)
    data_rank = layout.data_rank(rank)
    return BatchStream(sequences, settings, data_rank, layout.data, config.seed, pad_id, shuffle=False)


def batch_streams(
    config: Config, data: PreparedData, layout: Layout, rank: int
) -> tuple[BatchStream | StreamingBatches, BatchStream]:
    """This rank's training batches (shuffled each epoch) and held-out batches (fixed): its data-parallel
    replica's share (the ranks of a tensor or sequence group share their batches)."""
    settings = batch_settings(config, layout, rank)
    pad_id, data_rank = data.tokenizer.pad_token_id, layout.data_rank(rank)
    if config.data.streaming:
        stream_settings = StreamSettings(
            settings, config.data.shuffle_buffer, config.data.dedup, config.seed, data_rank
        )
        train_stream = StreamingBatches(data.train, data.tokenizer, stream_settings)
    else:
        train_stream = BatchStream(data.train, settings, data_rank, layout.data, config.seed, pad_id)
    return train_stream, fixed_stream(config, data.eval, pad_id, layout, rank)


def optimization(model: torch.nn.Module, config: Config):
    """Optimizer, LR schedule and unfreezing schedule; every parameter group exists before
    `deepspeed.initialize`, and gradual unfreezing gates each depth's group (see lmscale.model.finetune)."""
    unfreeze = config.finetune.unfreeze
    by_depth = unfreeze is not None
    optimizer = build_optimizer(model, config.optim, config.zero.offload == "cpu", by_depth)
    num_layers = num_layers_of(model)
    gates = None
    if by_depth:
        depths = group_depths(model, config.optim, by_depth)
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


def settle_training_length(config: Config, train_stream, world_size: int) -> None:
    """Say what an optimizer step really holds, and turn train.max_tokens / train.epochs into the step
    count the LR schedule needs (recorded in config.yaml as train.max_steps: what ran)."""
    epoch = train_stream.epoch_figures() if isinstance(train_stream, BatchStream) else None
    figures = step_figures(config, epoch, world_size)
    steps = steps_to_train(config, figures)
    log.info(batch_line(figures, steps, config))
    if config.train.max_steps is not None:
        return
    settled = {**config.train.model_dump(), "max_steps": steps, "max_tokens": None, "epochs": None}
    try:
        config.train = TrainConfig.model_validate(settled)
    except ValidationError as exc:
        problem = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{stop_key(config)} comes to {steps} steps: {problem}") from None


def run(config_path: str | None, overrides: list[str], force: bool = False) -> None:
    """Train one rank of the job described by the config and the launcher's environment."""
    select_accelerator()  # before anything imports deepspeed
    if "WORLD_SIZE" not in os.environ:
        ds_engine.set_single_process_env()
    is_rank_zero = ds_engine.rank() == 0
    configure_console(is_rank_zero)
    threads = ds_engine.share_cpu_cores()
    if threads:
        log.info("cpu: %s", threads)
    world_size = int(os.environ["WORLD_SIZE"])
    config, ds_config = resolve_run_config(config_path, overrides, world_size, ds_engine.has_gpu())
    layout = Layout(world_size, config.parallel.tensor, config.parallel.sequence)
    data_rank = layout.data_rank(ds_engine.rank())
    output_dir = Path(config.output_dir)
    check_start(config, force, find_checkpoint=False)  # plan_resume finds and verifies it
    resume = plan_resume(config, force, world_size)
    if already_done(resume.checkpoint, config, is_rank_zero):
        return
    ds_config = resume.apply_to(ds_config)
    data = prepare_data(
        config.data,
        config.model.path,
        data_rank,
        layout.data,
        config.model.trust_remote_code,
        config.finetune.task,
        config.finetune.num_labels,
    )
    # Every rank has its data now: nothing slow happens inside a collective.
    ds_engine.init_distributed(config.train.hang_timeout_s)
    torch.distributed.barrier()  # every rank has checked the run dir before rank 0 writes to it
    ds_engine.release_shared_memory_names()  # every rank has mapped every buffer by now
    model = build_model(
        config.model, data.tokenizer, config.data.max_seq_len, config.seed, config.finetune, data.labels
    )
    problems = model_split_problems(model, layout)
    if problems:
        raise ConfigError("; ".join(problems))
    log.info(
        "model: %s, %s, %s; %s, ZeRO-%d, %s",
        config.model.path or config.model.preset,
        describe_parameters(model),
        describe_fused(model),
        layout.describe(),
        config.zero.stage,
        config.precision,
    )
    if config.data.max_tokens_per_batch == "auto":
        config.data.max_tokens_per_batch = auto_token_budget(config, model, world_size)
    check_packing_support(config.data.batching)
    train_stream, eval_stream = batch_streams(config, data, layout, ds_engine.rank())
    settle_training_length(config, train_stream, layout.data)
    optimizer, scheduler, unfreezing = optimization(model, config)
    mpu = register_ulysses(model, layout) if layout.sequence > 1 else None
    engine = ds_engine.build_engine(model, optimizer, scheduler, ds_config, mpu)
    if config.train.chunked_loss:
        set_up_chunked_loss(engine.module, config.finetune.task)
    if config.model.compile:
        compile_model(engine)
    lock = RunLock(output_dir)
    watchdog = HangWatchdog(output_dir, ds_engine.rank(), config.train.hang_timeout_s, on_tick=lock.touch)
    try:
        # Written only now: a model, optimizer or DeepSpeed set-up that fails leaves no run directory behind.
        if is_rank_zero:
            lock.acquire()
            write_run_files(config, ds_config, output_dir, force)
            data.tokenizer.save_pretrained(str(RunDir(output_dir).tokenizer))
            write_labels(output_dir, data.labels)
        watchdog.start()
        if method_for(config.finetune).needs_reference:
            attach_reference(config, data, engine, resume.checkpoint is not None, watchdog, layout)
            train_stream, eval_stream = batch_streams(config, data, layout, ds_engine.rank())
        start = resume_point(engine, train_stream, output_dir, resume, is_rank_zero, config)
        streams = (train_stream, eval_stream)
        train_and_finish(config, engine, streams, unfreezing, model, start, watchdog, data.tokenizer, layout)
    finally:
        watchdog.stop()
        lock.release()
    ds_engine.shutdown_distributed()


def already_done(checkpoint: Path | None, config: Config, is_rank_zero: bool) -> bool:
    """A run whose newest checkpoint is at train.max_steps has nothing left to train: say so at once, before
    data, model, engine or W&B are touched (every rank decides the same from the same files)."""
    steps = config.train.max_steps
    if checkpoint is None or steps is None or checkpoint_step(checkpoint) < steps:
        return False
    if is_rank_zero:
        mark_finished(Path(config.output_dir), checkpoint_step(checkpoint), "reached train.max_steps")
        print(
            f"nothing to do: the run in {config.output_dir} already reached step {checkpoint_step(checkpoint)} "
            f"(train.max_steps={steps}); raise train.max_steps to train it further"
        )
    return True


def set_up_chunked_loss(model: torch.nn.Module, task: str) -> None:
    """Fuse the output layer into the loss where the family allows it, else the blockwise loss; says which."""
    problem = "classification heads are small" if task == "classification" else fused_head_problem(model)
    if problem is None:
        install_fused_head(model)
        log.info("chunked loss: output layer fused into the loss (the logits never exist whole)")
    else:
        log.info("chunked loss: blockwise over the logits, no fp32 copy (not fused: %s)", problem)


def attach_reference(
    config: Config, data: PreparedData, engine, resuming: bool, watchdog: HangWatchdog, layout: Layout
) -> None:
    """DPO: the starting model's log-probabilities of every pair, as columns of the training and held-out
    pairs; computed before the first step (all ranks), read back from the run dir on a resume."""
    run = RunDir(Path(config.output_dir))
    if resuming:
        tables = load_reference(run.reference_logps)
    else:
        log.info("dpo: reference log-probabilities of %d + %d pairs", len(data.train), len(data.eval))
        tables = {}
        rank = torch.distributed.get_rank()
        for split, pairs in (("train", data.train), ("eval", data.eval)):
            stream = fixed_stream(config, pairs, data.tokenizer.pad_token_id, layout, rank)
            tables[split] = reference_logps(
                engine, stream, lambda: watchdog.beat(0, "reference log-probabilities")
            )
        if ds_engine.rank() == 0:
            save_reference(run.reference_logps, tables)
    data.train = with_reference(data.train, tables["train"], "training")
    data.eval = with_reference(data.eval, tables["eval"], "held-out")


def harness_hook(config: Config, engine, tokenizer, watchdog: HangWatchdog):
    """The loop's benchmark hook: lm-eval on the live model at step 0, every eval.harness_every, and the end.

    Every rank runs the same requests in the same order, so ZeRO-3's per-layer gathers stay matched
    across ranks (and no rank waits idle in a collective while another scores); rank 0 logs.
    """
    settings = config.eval
    if not settings.harness_tasks:
        return lambda step, is_last: {}

    def run(step: int, is_last: bool) -> dict[str, float]:
        due = step == 0 or is_last or (settings.harness_every and step % settings.harness_every == 0)
        if not due:
            return {}
        watchdog.beat(step, "harness evaluation")
        table = run_harness(
            engine.module,
            tokenizer,
            settings.harness_tasks,
            settings.harness_include_path,
            settings.harness_limit,
        )
        watchdog.beat(step, "training step")
        return flat_metrics(table)

    return run


def train_and_finish(
    config, engine, streams, unfreezing, model, start: LoopStart, watchdog, tokenizer, layout: Layout
) -> None:
    """The training loop with its hooks, the replica check, and the closing summary."""
    train_stream, eval_stream = streams
    output_dir, is_rank_zero = Path(config.output_dir), ds_engine.rank() == 0
    stop = StopRequest()
    stop.install()
    method = method_for(config.finetune)
    hooks = LoopHooks(
        save=checkpoint_saver(engine, train_stream, output_dir, config, is_rank_zero, unfreezing),
        stop_requested=stop.agreed,
        length_cap=partial(
            seq_len_cap,
            start=config.data.seq_len_start,
            max_seq_len=config.data.max_seq_len,
            warmup_steps=config.data.seq_len_warmup_steps,
        ),
        throughput=throughput_model(config, model),
        before_step=unfreezing.apply,
        progress=watchdog.beat,
        harness=harness_hook(config, engine, tokenizer, watchdog),
        objective=method.objective(config) if method.objective else None,
        method=method,
        compile_clock=compile_seconds if config.model.compile else None,
    )
    sink = MetricsSink(
        config, output_dir, config.train.max_steps, enabled=is_rank_zero, initial_step=start.step
    )
    result = train(
        engine, train_stream, eval_stream, config.train, config.checkpoint, sink, hooks, start, layout
    )
    if config.model.compile:
        log.info("compile: %d graph(s), %.1f s compiling in all", compiled_graphs(), compile_seconds())
    digest = check_replicas_agree(engine, config.zero.stage, layout)
    if digest:
        log.info(
            "parameters identical on all %d data-parallel replicas (sha256 %s)", layout.data, digest[:16]
        )
    if result.stopped_by and result.stopped_by != EARLY_STOP:
        result.stopped_by = stop.signal_name
    finish(result, sink, is_rank_zero, start, config)


def finish(
    result: TrainResult, sink: MetricsSink, is_rank_zero: bool, start: LoopStart, config: Config
) -> None:
    """Summary table, W&B summary, and the closing line."""
    method = method_for(config.finetune)
    summary = {
        "steps": result.steps,
        "tokens": result.tokens,
        "wall_time_s": round(result.wall_time_s, 1),
        "eval_loss": result.final_eval_loss,
        "checkpoint": str(result.checkpoint),
    }
    if method.perplexity:
        summary["eval_ppl"] = perplexity(result.final_eval_loss)
    if method.accuracy_metric and result.final_eval_accuracy is not None:
        summary[f"eval_{method.accuracy_metric}"] = result.final_eval_accuracy
    sink.close(summary)
    if not is_rank_zero:
        return
    if result.stopped_by in (None, EARLY_STOP):  # not a stop signal: that run goes on when resumed
        mark_finished(Path(config.output_dir), result.steps, result.stopped_by or "reached train.max_steps")
    if result.stopped_by == EARLY_STOP:
        run = RunDir(Path(config.output_dir))
        best = run.checkpoints / run.best_tag()
        print(
            f"early stopping at step {result.steps}: held-out loss did not improve for "
            f"{config.train.early_stopping.patience} evaluations; best checkpoint {best}"
        )
    elif result.stopped_by:
        print(
            f"stopped by {result.stopped_by} at step {result.steps}; checkpoint {result.checkpoint}; "
            "run the same command again to resume"
        )
    elif result.checkpoint is None:
        print(
            f"nothing to do: the run in this output_dir already reached step {start.step} (train.max_steps)"
        )
    else:
        print(
            f"{closing_figure(result, method)} after {result.steps} steps, {result.tokens:,} tokens in "
            f"{result.wall_time_s:.0f} s; checkpoint {result.checkpoint}"
        )


def closing_figure(result: TrainResult, method: Method = SFT) -> str:
    """The method's held-out share where it has one (a classifier's or DPO's exp(loss) means nothing to a
    reader), perplexity otherwise."""
    if result.final_eval_accuracy is not None:
        name = method.accuracy_label
        untrained = (
            ""
            if result.initial_eval_accuracy is None
            else f" (untrained: {result.initial_eval_accuracy:.3f})"
        )
        return f"held-out {name}: {result.final_eval_accuracy:.3f}{untrained}"
    untrained = (
        ""
        if math.isnan(result.initial_eval_loss)
        else f" (untrained: {perplexity(result.initial_eval_loss):.1f})"
    )
    return f"held-out perplexity: {perplexity(result.final_eval_loss):.2f}{untrained}"


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
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        run(args.config, args.overrides, force=args.force)
    except LmscaleError as exc:
        if args.debug:
            raise
        tqdm.write(f"lmscale: error: {exc}", file=sys.stderr)  # clears an open progress bar line first
        return exc.exit_code
    except RuntimeError as exc:
        if args.debug or not is_lost_peer(exc):
            raise
        tqdm.write(f"lmscale: error: {lost_peer_line(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk or a read-only place, met after the start-up checks
        if args.debug or not is_write_failure(exc):
            raise
        tqdm.write(f"lmscale: error: {write_failure_line(exc)}", file=sys.stderr)
        return 1
    return 0


# What gloo says when the process at the other end of a collective is gone.
LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def is_lost_peer(exc: RuntimeError) -> bool:
    return any(marker in str(exc) for marker in LOST_PEER)


def lost_peer_line(exc: RuntimeError) -> str:
    detail = next(marker for marker in LOST_PEER if marker in str(exc))
    return (
        f"rank {ds_engine.rank()} lost another rank of the job ({detail}): it died or its node is gone, see that "
        "rank's messages above; run the same command again to resume from the last checkpoint"
    )


if __name__ == "__main__":
    sys.exit(main())
