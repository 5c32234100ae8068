"""The training loop: it receives a ready engine, data and a metrics sink, and only orchestrates."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmscale import faults
from lmscale.data.batches import Batch, BatchStream, step_targets, truncate_batch
from lmscale.methods import SFT, Method
from lmscale.objectives.loss import (
    Objective,
    add_sums,
    cross_entropy_objective,
    figure_means,
    objective_totals,
    perplexity,
)
from lmscale.parallel.layout import Layout
from lmscale.reporting.sink import MetricsSink
from lmscale.reporting.throughput import ThroughputModel
from lmscale.training.profiling import StepProfiler
from lmscale.training.step_metrics import (
    Window,
    all_ranks_sum,
    gradient_norm,
    log_window,
    summed_counts,
)
from lmscale.training.stopping import EARLY_STOP, EarlyStopping, NonFiniteGuard
from lmscale.training.stragglers import ForwardClock

if TYPE_CHECKING:
    from lmscale.data.streaming import StreamingBatches
    from lmscale.runs.run import Run


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


# (a step's tokens per [layer, expert] on this rank, or None for a dense model) -> nothing
RoutingHook = Callable[[torch.Tensor | None], None]


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
    means = figure_means(dict(zip(names, totals[2:], strict=True)), count)
    return Evaluation(totals[0] / count, means, method)


def train_step(
    engine: Any,
    micro_batches: list[Batch],
    layout: Layout,
    window: Window,
    log_grad_norm: bool,
    objective: Objective | None = None,
    after_update: RoutingHook | None = None,
) -> float | None:
    """One optimizer step over `micro_batches`, the loss averaged over every target token of the step.

    Batches differ in size across micro-steps and ranks, so a per-batch mean would weight tokens
    unequally. Each micro-batch's summed loss is divided by the step's target count over all
    data-parallel ranks (known from the epoch plan, no communication needed) and multiplied by the
    ranks DeepSpeed averages gradients over x accumulation steps, which DeepSpeed's gradient
    averaging and accumulation scaling divide out again. `objective` defaults to plain cross-entropy;
    `after_update` gets the step's tokens per expert after the optimizer step (a mixture-of-experts model's).
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
    step_expert_tokens = None
    for index, batch in enumerate(micro_batches):
        window.add(batch)
        with window.forward_clock.measure() if window.forward_clock else contextlib.nullcontext():
            parts = objective(engine, batch)
        engine.backward(parts.summed * scale)
        window.targets += parts.targets
        add_sums(window.sums, parts.sums)
        window.add_expert_tokens(parts.expert_tokens)
        step_expert_tokens = summed_counts(step_expert_tokens, parts.expert_tokens)
        if log_grad_norm and index == len(micro_batches) - 1:
            own_grad_norm = gradient_norm(engine)
        engine.step()
        window.loss_sum += parts.summed.detach().double() * share
        window.micro_steps += 1
    if after_update is not None:
        after_update(step_expert_tokens)
    return own_grad_norm


def gradient_divisor(layout: Layout, zero_stage: int) -> int:
    """The ranks DeepSpeed (0.19) divides summed gradients by: the data-parallel ones; every rank of each
    sequence group too under ZeRO-3, and with tensor parallelism (whose mesh DeepSpeed is told of instead
    of the sequence groups: lmscale.parallel.ulysses); ZeRO 0-2 with sequence parallelism alone sum a
    group's slices and divide by the data-parallel ranks only. Pinned by tests/parallel/test_parallel_runs.py,
    which compares each layout's losses with one process."""
    if zero_stage == 3 or layout.tensor > 1:
        return layout.data * layout.sequence
    return layout.data


def no_length_cap(step: int) -> int | None:
    return None


@dataclass(frozen=True)
class SavePoint:
    """What the loop hands its save hook."""

    step: int
    tokens_seen: int
    best_eval_loss: float  # the lowest held-out loss so far
    is_best: bool  # this step's evaluation set that best


SaveHook = Callable[[SavePoint], Path]  # writes a checkpoint, returns its directory


@dataclass
class LoopHooks:
    """What the loop calls out to, so it never builds or saves anything itself."""

    save: SaveHook
    stop_requested: Callable[[], bool]  # agreed across ranks (a collective)
    # (wait) -> completes a checkpoint written in the background once every rank's files are durable (all of
    # them with wait); its directory when completed now. Every rank calls it after each step.
    settle_saves: Callable[[bool], Path | None] = lambda wait: None
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
    # An online method's held-out figures, (loss, figures), in place of the objective on held-out batches
    held_out: Callable[[], tuple[float, dict[str, float]]] | None = None
    # Figures measured outside the steps' micro-batches (an online method's generation), logged each log step
    window_figures: Callable[[], dict[str, float]] = dict
    # (the step's tokens per [layer, expert] on this rank, or None) -> e.g. the routers' bias update; every rank
    # calls it after every optimizer step
    after_update: RoutingHook | None = None


@dataclass
class LoopStart:
    """Where the loop begins: step 0, or a resumed checkpoint's position."""

    step: int = 0
    tokens_seen: int = 0
    best_eval_loss: float = math.inf


@dataclass
class Streams:
    """This rank's training batches (shuffled each epoch, or streamed) and held-out batches (fixed)."""

    train: BatchStream | StreamingBatches
    eval: BatchStream


def train(
    engine: Any,
    streams: Streams,
    run: Run,
    sink: MetricsSink,
    hooks: LoopHooks,
    start: LoopStart | None = None,
) -> TrainResult:
    """Train to train.max_steps: log every train.log_every, evaluate every train.eval_every, save every
    checkpoint.save_every, and stop early (with a checkpoint) when a stop signal is agreed."""
    return TrainingLoop(engine, streams, run, sink, hooks, start or LoopStart()).run()


class TrainingLoop:
    """Where one rank's training stands, and the order of things in each step."""

    def __init__(
        self, engine: Any, streams: Streams, run: Run, sink: MetricsSink, hooks: LoopHooks, start: LoopStart
    ) -> None:
        self.engine, self.streams, self.sink, self.hooks = engine, streams, sink, hooks
        self.settings, self.checkpointing = run.config.train, run.config.checkpoint
        self.layout, self.rank = run.layout, run.rank
        profiled = self.settings.profile_steps
        self.profiler = StepProfiler(
            profiled, run.dir.profile_trace(run.rank, profiled) if profiled else None
        )
        chunked = self.settings.chunked_loss
        self.train_objective = hooks.objective or cross_entropy_objective(
            self.settings.label_smoothing, chunked, router_loss=True
        )
        self.eval_objective = hooks.objective or cross_entropy_objective(chunked=chunked)
        self.step, self.tokens_seen, self.best_eval = start.step, start.tokens_seen, start.best_eval_loss
        self.initial = self.final = Evaluation(math.nan, {}, hooks.method)
        self.checkpoint: Path | None = None
        self.settling_s = 0.0  # time spent on a background checkpoint's completion since it was handed over
        self.guard = NonFiniteGuard(self.settings.max_nonfinite_steps, int(engine.skipped_steps))
        stopping = self.settings.early_stopping
        self.early = EarlyStopping(stopping.patience, stopping.min_delta, best=self.best_eval)
        # The loss stays on the device between log steps: reading it every step would force a sync.
        loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
        # Forward passes are timed only where a slower rank can be found (lmscale.training.stragglers).
        clock = ForwardClock(engine.device) if run.layout.world_size > 1 else None
        self.window = Window(loss_sum=loss_sum, compile_clock=hooks.compile_clock, forward_clock=clock)

    def run(self) -> TrainResult:
        if self.step == 0:
            self.initial = self.final = self.evaluate_held_out("untrained")
            log_harness(0, False, self.hooks, self.sink)
        # Train mode whatever ran before: `from_pretrained` returns a model in eval mode, and a resumed run has
        # no step-0 evaluation to switch it back (it trained without dropout, unlike the run it continues).
        self.engine.train()
        self.window.reset()
        started_s, batches, stopped_by = time.perf_counter(), iter(self.streams.train), None
        while self.step < self.settings.max_steps and stopped_by is None:
            stopped_by = self.train_one_step(batches)
        self.settle_saves(wait=True)  # the last checkpoint is complete before the run says it is
        return TrainResult(
            self.step,
            self.tokens_seen,
            time.perf_counter() - started_s,
            self.initial.loss,
            self.final.loss,
            self.initial.accuracy,
            self.final.accuracy,
            self.checkpoint,
            stopped_by,
        )

    def train_one_step(self, batches: Iterator[Batch]) -> str | None:
        """One optimizer step with its logging, evaluation, benchmark and checkpoint; why training stops
        after it, or None."""
        self.step += 1
        step, settings = self.step, self.settings
        is_last = step == settings.max_steps
        is_log_step = step % settings.log_every == 0 or is_last
        self.profiler.before_step(step)
        own_grad_norm = self.optimizer_step(batches, is_log_step)
        self.profiler.after_step(step, last=is_last)
        skipped = self.guard.check(int(self.engine.skipped_steps), step)
        if skipped:
            self.sink.message(f"step {step}: skipped (non-finite loss or gradient)")
        self.sink.advance()
        stop = self.hooks.stop_requested()
        if stop:  # a run stopped inside the profiled steps still writes what it traced
            self.profiler.after_step(step, last=True)
        if is_log_step or stop:
            self.tokens_seen += log_window(
                self.engine, self.window, step, own_grad_norm, self.tokens_seen, self.sink,
                self.hooks.throughput, self.layout, self.hooks.window_figures(),
            )  # fmt: skip
        is_best = plateaued = False
        if step % settings.eval_every == 0 or is_last:
            self.final = self.evaluate_held_out(f"step {step}")
            is_best, self.best_eval = self.final.loss < self.best_eval, min(self.best_eval, self.final.loss)
            plateaued = self.early.should_stop(self.final.loss)
        if log_harness(step, is_last, self.hooks, self.sink):
            self.window.start_s = time.perf_counter()  # benchmark time is not training throughput
        # No routine checkpoint right after a skipped step: the last one before it stays the newest.
        # With early stopping, every new best is saved, so the best model is a checkpoint to keep.
        routine = step % self.checkpointing.save_every == 0 and not skipped
        keep_best = is_best and settings.early_stopping.patience is not None
        if routine or is_last or stop or plateaued or keep_best:
            self.save(is_best)
        self.settle_saves(wait=False)
        if stop or plateaued:
            return "a stop signal" if stop else EARLY_STOP
        return None

    def optimizer_step(self, batches: Iterator[Batch], is_log_step: bool) -> float | None:
        """Read the step's micro-batches (timing the wait) and train on them; the gradient norm on log steps
        where the engine reports none."""
        step, hooks = self.step, self.hooks
        hooks.before_step(step - 1)
        wait_start = time.perf_counter()
        faults.before_batches(step, self.rank)
        micro_batches = [next(batches) for _ in range(self.settings.grad_accum_steps)]
        self.window.data_wait_s += time.perf_counter() - wait_start  # a data stall shows here, not in compute
        self.window.steps += 1
        cap = hooks.length_cap(step - 1)
        if cap is not None:
            micro_batches = [truncate_batch(b, cap) for b in micro_batches]
        grad_norm = train_step(
            self.engine,
            micro_batches,
            self.layout,
            self.window,
            is_log_step,
            self.train_objective,
            hooks.after_update,
        )
        hooks.progress(step, "training step")
        faults.after_step(step, self.rank)
        return grad_norm

    def evaluate_held_out(self, label: str) -> Evaluation:
        """Evaluate, log the figures and say them (`label`: "untrained", "step N")."""
        step, hooks = self.step, self.hooks
        hooks.progress(step, "evaluation")
        if hooks.held_out is not None:
            evaluation = Evaluation(*hooks.held_out(), hooks.method)
        else:
            evaluation = evaluate(
                self.engine,
                self.streams.eval,
                self.settings.eval_batches,
                self.eval_objective,
                partial(hooks.progress, step, "evaluation"),
                hooks.method,
            )
        self.sink.log(step, evaluation.metrics())
        self.sink.message(
            f"{label} {evaluation.describe()}" if step == 0 else f"{label}: {evaluation.describe()}"
        )
        self.window.start_s = time.perf_counter()  # evaluation time is not training throughput
        return evaluation

    def save(self, is_best: bool) -> None:
        started_s = time.perf_counter()
        self.hooks.progress(self.step, "saving a checkpoint")
        point = SavePoint(self.step, self.tokens_seen, self.best_eval, is_best)
        self.checkpoint = self.hooks.save(point)
        self.hooks.progress(self.step, "training step")
        self.window.start_s = time.perf_counter()
        self.sink.log(self.step, {"checkpoint_stall_s": self.window.start_s - started_s})

    def settle_saves(self, wait: bool) -> None:
        """Complete a checkpoint written in the background when its files are durable; the time this takes
        on the training path (the ranks' agreement each step, the completion) is logged when it completes."""
        started_s = time.perf_counter()
        if wait:
            self.hooks.progress(self.step, "finishing a checkpoint written in the background")
        completed = self.hooks.settle_saves(wait)
        self.settling_s += time.perf_counter() - started_s
        if completed is not None:
            self.sink.log(self.step, {"checkpoint_stall_s": self.settling_s})
            self.settling_s = 0.0


def log_harness(step: int, is_last: bool, hooks: LoopHooks, sink: MetricsSink) -> bool:
    """Run the benchmark hook if this step is one of its steps; True when it ran."""
    metrics = hooks.harness(step, is_last)
    if metrics:
        sink.log(step, metrics)
        shown = ", ".join(f"{key.removeprefix('harness/')} {value:.4f}" for key, value in metrics.items())
        sink.message(f"step {step}: {shown}")
    return bool(metrics)
