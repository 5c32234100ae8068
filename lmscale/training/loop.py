"""The training loop: it receives a ready engine, data and a metrics sink, and only orchestrates."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lmscale import faults
from lmscale.config import CheckpointConfig, TrainConfig
from lmscale.data.batches import Batch, BatchStream, step_targets, truncate_batch
from lmscale.errors import LmscaleError
from lmscale.methods import SFT, Method
from lmscale.objectives.loss import Objective, add_sums, cross_entropy_objective, objective_totals, perplexity
from lmscale.parallel.layout import Layout
from lmscale.reporting.sink import MetricsSink
from lmscale.reporting.throughput import ThroughputModel

EARLY_STOP = "early stopping"


@dataclass
class TrainResult:
    steps: int
    tokens: int
    wall_time_s: float
    initial_eval_loss: float  # NaN when resumed
    final_eval_loss: float
    initial_eval_accuracy: float | None  # classification only; None for language models and when resumed
    final_eval_accuracy: float | None
    checkpoint: Path | None
    stopped_by: str | None  # None when training reached max_steps


def all_ranks_sum(values: list[float | torch.Tensor], device: torch.device) -> list[float]:
    """Sum scalars over all ranks in one collective."""
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    return stacked.tolist()


@dataclass
class Evaluation:
    loss: float  # mean per target over all ranks
    means: dict[str, float]  # the objective's other figures per target: accuracy, pref_accuracy, rewards_*
    method: Method = SFT  # how its figures read

    @property
    def accuracy(self) -> float | None:
        """The method's held-out share (classification: rows classified right; DPO: pairs ranked right)."""
        return self.means.get(self.method.accuracy_metric) if self.method.accuracy_metric else None

    def describe(self) -> str:
        return self.method.describe_evaluation(self.loss, self.means, perplexity(self.loss))

    def metrics(self) -> dict[str, float]:
        figures = {"eval_loss": self.loss}
        if self.method.perplexity:  # exp of a DPO loss or of a class cross-entropy is no perplexity
            figures["eval_ppl"] = perplexity(self.loss)
        return figures | {f"eval_{name}": value for name, value in self.means.items()}


@torch.no_grad()
def evaluate(
    engine: Any,
    stream: BatchStream,
    max_batches: int,
    objective: Objective,
    progress: Callable[[], None] = lambda: None,
    method: Method = SFT,
) -> Evaluation:
    """Held-out loss (and the objective's other figures) over all ranks; every rank runs the same
    batches. `progress` is called after each batch (the hang watchdog's heartbeat)."""
    engine.eval()
    batches = stream.loader(epoch=0, start=0, stop=max_batches)
    loss_sum, targets, sums = objective_totals(engine, batches, objective, progress)
    engine.train()
    names = sorted(sums)  # the same on every rank: every batch of an objective reports the same figures
    totals = all_ranks_sum([loss_sum, targets, *(sums[n] for n in names)], engine.device)
    count = max(totals[1], 1)
    means = {n: t / count for n, t in zip(names, totals[2:], strict=True)}
    return Evaluation(totals[0] / count, means, method)


def gradient_norm(engine: Any) -> float | None:
    """Global gradient norm before clipping, for engines that do not report one (ZeRO-0 in fp32).

    Called just before the optimizer step on logging steps only, while `param.grad` is still whole.
    """
    if engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else None


@dataclass
class Window:
    """What happened since the last logged step, kept on the host (and the loss on the device)."""

    loss_sum: torch.Tensor
    steps: int = 0
    micro_steps: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    sequences: int = 0
    sum_sq_len: int = 0
    data_wait_s: float = 0.0
    start_s: float = 0.0
    targets: int = 0  # this rank's loss targets, the divisor of `sums`
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # the objective's figures, on the device
    compile_clock: Callable[[], float] | None = None  # seconds spent compiling so far (model.compile)
    compile_start_s: float = 0.0

    def compiling_s(self) -> float:
        """Seconds spent compiling since the window started (not training throughput)."""
        return self.compile_clock() - self.compile_start_s if self.compile_clock else 0.0

    def add(self, batch: Batch) -> None:
        self.real_tokens += batch.real_tokens
        self.padded_tokens += batch.padded_tokens
        self.sequences += batch.sequences
        self.sum_sq_len += batch.sum_sq_len

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.steps = self.micro_steps = self.real_tokens = self.padded_tokens = self.sequences = (
            self.sum_sq_len
        ) = 0
        self.data_wait_s = 0.0
        self.targets = 0
        self.sums = {}
        self.start_s = time.perf_counter()
        self.compile_start_s = self.compile_clock() if self.compile_clock else 0.0


def train_step(
    engine: Any,
    micro_batches: list[Batch],
    layout: Layout,
    window: Window,
    log_grad_norm: bool,
    objective: Objective | None = None,
) -> float | None:
    """One optimizer step over `micro_batches`, the loss averaged over every target token of the step.

    Batches differ in size across micro-steps and ranks, so a per-batch mean would weight tokens
    unequally. Each micro-batch's summed loss is divided by the step's target count over all
    data-parallel ranks (known from the epoch plan, no communication needed) and multiplied by the
    ranks DeepSpeed averages gradients over x accumulation steps, which DeepSpeed's gradient
    averaging and accumulation scaling divide out again. `objective` defaults to plain cross-entropy.
    """
    objective = objective or cross_entropy_objective()
    targets = step_targets(micro_batches)
    if (
        targets is None
    ):  # streamed batches: each rank knows only its own, so add them up (one tiny collective)
        own = sum(b.local_targets for b in micro_batches)
        targets = all_ranks_sum([own], engine.device)[0] / layout.copies
    # What one summed unit of a micro-batch's loss is of the step's mean (x accumulation steps).
    share = len(micro_batches) / max(targets, 1)
    scale = gradient_divisor(layout, engine.zero_optimization_stage()) * share
    own_grad_norm = None
    for index, batch in enumerate(micro_batches):
        window.add(batch)
        parts = objective(engine, batch)
        engine.backward(parts.summed * scale)
        window.targets += parts.targets
        add_sums(window.sums, parts.sums)
        if log_grad_norm and index == len(micro_batches) - 1:
            own_grad_norm = gradient_norm(engine)
        engine.step()
        window.loss_sum += parts.summed.detach().double() * share
        window.micro_steps += 1
    return own_grad_norm


def gradient_divisor(layout: Layout, zero_stage: int) -> int:
    """The ranks DeepSpeed (0.19) divides summed gradients by: the data-parallel ones; every rank of each
    sequence group too under ZeRO-3, and with tensor parallelism (whose mesh DeepSpeed is told of instead
    of the sequence groups: lmscale.parallel.ulysses); ZeRO 0-2 with sequence parallelism alone sum a
    group's slices and divide by the data-parallel ranks only. Pinned by tests/test_parallel_runs.py,
    which compares each layout's losses with one process."""
    if zero_stage == 3 or layout.tensor > 1:
        return layout.data * layout.sequence
    return layout.data


def no_length_cap(step: int) -> int | None:
    return None


@dataclass
class LoopHooks:
    """What the loop calls out to, so it never builds or saves anything itself."""

    save: Callable[
        [int, int, float, bool], Path
    ]  # (step, tokens_seen, best eval loss, is it this step's) -> path
    stop_requested: Callable[[], bool]  # agreed across ranks (a collective)
    length_cap: Callable[[int], int | None] = no_length_cap  # sequence-length warm-up
    throughput: ThroughputModel | None = None  # token counts -> TFLOP/s, MFU, HFU
    before_step: Callable[[int], None] = lambda step: None  # (0-based step) -> e.g. unfreeze layers
    # (steps done, what comes next) -> the hang watchdog's heartbeat; also the fault tests' hook
    progress: Callable[[int, str], None] = lambda step, phase: None
    # (step, is it the last) -> benchmark metrics to log at that step, or {} (every rank calls it)
    harness: Callable[[int, bool], dict[str, float]] = lambda step, is_last: {}
    objective: Objective | None = None  # the loss; None = cross-entropy with train.label_smoothing
    method: Method = SFT  # how evaluations read (the objective is the method's)
    compile_clock: Callable[[], float] | None = None  # model.compile: seconds spent compiling so far


@dataclass
class NonFiniteGuard:
    """Counts optimizer steps DeepSpeed skipped in a row (non-finite gradients) from its host-side counter."""

    limit: int
    skipped_before: int = 0
    in_a_row: int = 0

    def check(self, skipped_total: int, step: int) -> bool:
        """True when this step was skipped; raises once `limit` steps in a row were."""
        skipped = skipped_total > self.skipped_before
        self.skipped_before = skipped_total
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if self.in_a_row >= self.limit:
            raise LmscaleError(
                f"{self.in_a_row} steps in a row up to step {step} had a non-finite loss or gradient: lower optim.lr "
                "or check the data; the last checkpoint saved before them is kept"
            )
        return skipped


@dataclass
class EarlyStopping:
    """Stop when `patience` evaluations in a row did not lower the best eval loss by more than `min_delta`."""

    patience: int | None
    min_delta: float
    best: float = math.inf
    stale: int = 0

    def should_stop(self, eval_loss: float) -> bool:
        if eval_loss < self.best - self.min_delta:
            self.best, self.stale = eval_loss, 0
        else:
            self.stale += 1
        return self.patience is not None and self.stale >= self.patience


@dataclass
class LoopStart:
    """Where the loop begins: step 0, or a resumed checkpoint's position."""

    step: int = 0
    tokens_seen: int = 0
    best_eval_loss: float = math.inf


def train(
    engine: Any,
    train_stream: BatchStream,
    eval_stream: BatchStream,
    config: TrainConfig,
    checkpointing: CheckpointConfig,
    sink: MetricsSink,
    hooks: LoopHooks,
    start: LoopStart | None = None,
    layout: Layout | None = None,
) -> TrainResult:
    """Train to `config.max_steps`: log every `log_every`, evaluate every `eval_every`, save every
    `checkpointing.save_every`, and stop early (with a checkpoint) when a stop signal is agreed.
    `layout` defaults to data parallelism over every rank."""
    start = start or LoopStart()
    layout = layout or Layout(dist.get_world_size())
    train_objective = hooks.objective or cross_entropy_objective(
        config.label_smoothing, config.chunked_loss, router_loss=True
    )
    eval_objective = hooks.objective or cross_entropy_objective(chunked=config.chunked_loss)
    batches: Iterator[Batch] = iter(train_stream)
    initial_eval = final_eval = math.nan
    initial_accuracy = final_accuracy = None
    if start.step == 0:
        hooks.progress(0, "evaluation")
        evaluation = evaluate(
            engine,
            eval_stream,
            config.eval_batches,
            eval_objective,
            lambda: hooks.progress(0, "evaluation"),
            hooks.method,
        )
        initial_eval = final_eval = evaluation.loss
        initial_accuracy = final_accuracy = evaluation.accuracy
        sink.log(0, evaluation.metrics())
        sink.message(f"untrained {evaluation.describe()}")
        log_harness(0, False, hooks, sink)
    # The loss stays on the device between log steps: reading it every step would force a sync.
    window = Window(
        loss_sum=torch.zeros((), dtype=torch.float64, device=engine.device), compile_clock=hooks.compile_clock
    )
    window.reset()
    started_s, tokens_seen, best_eval = time.perf_counter(), start.tokens_seen, start.best_eval_loss
    step, stopped_by, checkpoint = start.step, None, None
    guard = NonFiniteGuard(config.max_nonfinite_steps, skipped_before=int(engine.skipped_steps))
    early = EarlyStopping(config.early_stopping.patience, config.early_stopping.min_delta, best=best_eval)
    while step < config.max_steps:
        step += 1
        hooks.before_step(step - 1)
        is_last = step == config.max_steps
        is_log_step = step % config.log_every == 0 or is_last
        wait_start = time.perf_counter()
        micro_batches = [next(batches) for _ in range(config.grad_accum_steps)]
        window.data_wait_s += time.perf_counter() - wait_start  # a data stall shows here, not in compute
        window.steps += 1
        cap = hooks.length_cap(step - 1)
        if cap is not None:
            micro_batches = [truncate_batch(b, cap) for b in micro_batches]
        own_grad_norm = train_step(engine, micro_batches, layout, window, is_log_step, train_objective)
        hooks.progress(step, "training step")
        faults.after_step(step, dist.get_rank())
        skipped = guard.check(int(engine.skipped_steps), step)
        if skipped:
            sink.message(f"step {step}: skipped (non-finite loss or gradient)")
        sink.advance()
        stop = hooks.stop_requested()
        if is_log_step or stop:
            tokens_seen += log_window(
                engine, window, step, own_grad_norm, tokens_seen, sink, hooks.throughput, layout
            )
        is_best = plateaued = False
        if step % config.eval_every == 0 or is_last:
            hooks.progress(step, "evaluation")
            evaluation = evaluate(
                engine,
                eval_stream,
                config.eval_batches,
                eval_objective,
                partial(hooks.progress, step, "evaluation"),
                hooks.method,
            )
            final_eval, final_accuracy = evaluation.loss, evaluation.accuracy
            is_best, best_eval = final_eval < best_eval, min(best_eval, final_eval)
            plateaued = early.should_stop(final_eval)
            sink.log(step, evaluation.metrics())
            sink.message(f"step {step}: {evaluation.describe()}")
            window.start_s = time.perf_counter()  # evaluation time is not training throughput
        if log_harness(step, is_last, hooks, sink):
            window.start_s = time.perf_counter()  # nor is benchmark time
        # No routine checkpoint right after a skipped step: the last one before it stays the newest.
        # With early stopping, every new best is saved, so the best model is a checkpoint to keep.
        keep_best = is_best and config.early_stopping.patience is not None
        if (
            (step % checkpointing.save_every == 0 and not skipped)
            or is_last
            or stop
            or plateaued
            or keep_best
        ):
            hooks.progress(step, "saving a checkpoint")
            checkpoint = hooks.save(step, tokens_seen, best_eval, is_best)
            hooks.progress(step, "training step")
            window.start_s = time.perf_counter()
        if stop or plateaued:
            stopped_by = "a stop signal" if stop else EARLY_STOP
            break
    return TrainResult(
        step,
        tokens_seen,
        time.perf_counter() - started_s,
        initial_eval,
        final_eval,
        initial_accuracy,
        final_accuracy,
        checkpoint,
        stopped_by,
    )


def log_harness(step: int, is_last: bool, hooks: LoopHooks, sink: MetricsSink) -> bool:
    """Run the benchmark hook if this step is one of its steps; True when it ran."""
    metrics = hooks.harness(step, is_last)
    if metrics:
        sink.log(step, metrics)
        shown = ", ".join(f"{key.removeprefix('harness/')} {value:.4f}" for key, value in metrics.items())
        sink.message(f"step {step}: {shown}")
    return bool(metrics)


def memory_figures(device: torch.device) -> dict[str, float]:
    """This rank's memory: the GPU's peak allocated/reserved, or the process's resident set on a CPU."""
    if device.type == "cuda":
        return {
            "memory_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
            "memory_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    import psutil

    return {"memory_rss_gb": psutil.Process().memory_info().rss / 2**30}


def largest_over_ranks(figures: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each figure's maximum over all ranks (the rank closest to running out is the one that matters)."""
    values = torch.tensor(list(figures.values()), dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return dict(zip(figures, values.tolist(), strict=True))


def loss_scale(engine: Any) -> float | None:
    """The fp16 dynamic loss scale, wherever this DeepSpeed optimizer keeps it."""
    if not engine.fp16_enabled():
        return None
    optimizer = engine.optimizer
    scale = getattr(optimizer, "cur_scale", None) or getattr(optimizer, "loss_scale", None)
    return float(scale) if scale is not None else None


def log_window(
    engine: Any,
    window: Window,
    step: int,
    own_grad_norm: float | None,
    tokens_before: int,
    sink: MetricsSink,
    throughput: ThroughputModel | None,
    layout: Layout,
) -> int:
    """Reduce the window over ranks, log it, reset it; returns the real tokens it held (all ranks)."""
    world_size = layout.world_size
    names = sorted(window.sums)
    totals = all_ranks_sum(
        [
            window.loss_sum,
            window.real_tokens,
            window.padded_tokens,
            window.sequences,
            window.sum_sq_len,
            window.data_wait_s,
            window.targets,
            *(window.sums[n] for n in names),
        ],
        engine.device,
    )
    loss_total, real, padded, sequences, sum_sq_len, data_wait_s, targets = totals[:7]
    # Each batch ran on every rank of its tensor or sequence group: count it once (means are unaffected).
    real, padded, sequences, sum_sq_len = (v / layout.copies for v in (real, padded, sequences, sum_sq_len))
    compiling_s = window.compiling_s()
    elapsed_s = time.perf_counter() - window.start_s - compiling_s
    grad_norm = own_grad_norm if own_grad_norm is not None else engine.get_global_grad_norm()
    metrics = {
        # Every rank's window holds its share of each step's mean (a tensor group's ranks, all of it).
        "loss": loss_total / (layout.tensor * window.micro_steps),
        "lr": engine.get_lr()[0],
        "grad_norm": float(grad_norm),
        "tokens_per_s": real / elapsed_s,
        "tokens_per_s_per_device": real / elapsed_s / world_size,
        "samples_per_s": sequences / elapsed_s,
        "padding_frac": 1.0 - real / max(padded, 1),
        "step_time_s": elapsed_s / window.steps,
        "data_wait_s": data_wait_s / world_size / window.steps,
        "tokens_seen": tokens_before + int(real),
        "skipped_steps": int(engine.skipped_steps),
    }
    metrics.update({n: t / max(targets, 1) for n, t in zip(names, totals[7:], strict=True)})
    if compiling_s > 0:
        metrics["compile_s"] = compiling_s
    if throughput is not None:
        metrics.update(throughput.figures(int(real), int(sum_sq_len), elapsed_s, world_size))
    scale = loss_scale(engine)
    if scale is not None:
        metrics["loss_scale"] = scale
    metrics.update(largest_over_ranks(memory_figures(engine.device), engine.device))
    sink.log(step, metrics)
    window.reset()
    return int(real)


def parameter_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in name order."""
    digest = hashlib.sha256()
    for name, param in sorted(module.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_replicas_agree(engine: Any, zero_stage: int, layout: Layout | None = None) -> str | None:
    """Data-parallel replicas must end with the same weights (ZeRO 0-2 keep a full copy on every rank;
    with tensor parallelism, the ranks holding the same slice).

    Compared once at the end of a run: a difference means the ranks trained different models (a
    broken network, a non-deterministic collective), which no loss curve would show. Returns the
    digest of rank 0's weights.
    """
    layout = layout or Layout(dist.get_world_size())
    if layout.data == 1 or zero_stage == 3:
        return None
    digests: list[str | None] = [None] * layout.world_size
    dist.all_gather_object(digests, parameter_digest(engine.module))
    for slice_index in range(layout.tensor):
        replicas = {d for rank, d in enumerate(digests) if layout.tensor_rank(rank) == slice_index}
        if len(replicas) > 1:
            raise LmscaleError(
                f"the {layout.data} data-parallel replicas ended with different parameters "
                f"({sorted(replicas)[0][:12]}...): they diverged; check the network between nodes and rerun "
                "from the last checkpoint"
            )
    return digests[0]
