"""What the loop measures between logged steps (a Window of micro-batches), reduced over ranks and logged:
loss, LR, gradient norm, tokens/s, padding, data wait, TFLOP/s and MFU, memory."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from lmscale.data.batches import Batch
from lmscale.objectives.loss import figure_means
from lmscale.parallel.layout import Layout
from lmscale.reporting.sink import MetricsSink
from lmscale.reporting.throughput import ThroughputModel
from lmscale.training.stragglers import ForwardClock, RankTimes, StragglerWatch, gather_rank_times, slowest


def all_ranks_sum(values: list[float | torch.Tensor], device: torch.device) -> list[float]:
    """Sum scalars over all ranks in one collective."""
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    return stacked.tolist()


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
    expert_tokens: torch.Tensor | None = None  # tokens routed to each [layer, expert] (MoE models)
    compile_clock: Callable[[], float] | None = None  # seconds spent compiling so far (model.compile)
    compile_start_s: float = 0.0
    forward_clock: ForwardClock | None = None  # this rank's forward passes (the stragglers' figure)
    stragglers: StragglerWatch = field(default_factory=StragglerWatch)  # kept across windows

    def compiling_s(self) -> float:
        """Seconds spent compiling since the window started (not training throughput)."""
        return self.compile_clock() - self.compile_start_s if self.compile_clock else 0.0

    def add(self, batch: Batch) -> None:
        self.real_tokens += batch.real_tokens
        self.padded_tokens += batch.padded_tokens
        self.sequences += batch.sequences
        self.sum_sq_len += batch.sum_sq_len

    def add_expert_tokens(self, counts: torch.Tensor | None) -> None:
        self.expert_tokens = summed_counts(self.expert_tokens, counts)

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.steps = self.micro_steps = self.real_tokens = self.padded_tokens = self.sequences = (
            self.sum_sq_len
        ) = 0
        self.data_wait_s = 0.0
        self.targets = 0
        self.sums = {}
        self.expert_tokens = None
        self.start_s = time.perf_counter()
        self.compile_start_s = self.compile_clock() if self.compile_clock else 0.0
        if self.forward_clock is not None:
            self.forward_clock.take_s()


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


def straggler_figures(
    window: Window, device: torch.device, step_time_s: float, sink: MetricsSink
) -> dict[str, float]:
    """The slowest rank of the window and its lag per step (lmscale.training.stragglers); a rank that stays
    clearly slowest is named on the console once. Only jobs of several ranks have a forward clock."""
    if window.forward_clock is None or window.steps == 0:
        return {}
    forward_s = window.forward_clock.take_s()
    own = RankTimes(window.data_wait_s / window.steps, forward_s / window.steps)
    straggler = slowest(gather_rank_times(own, device))
    warning = window.stragglers.observe(straggler, step_time_s)
    if warning:
        sink.message(f"warning: {warning}")
    return {"straggler_rank": straggler.rank, "straggler_lag": straggler.lag_s}


def summed_counts(total: torch.Tensor | None, counts: torch.Tensor | None) -> torch.Tensor | None:
    """Routing counts added up, either of them None (no router ran)."""
    if counts is None:
        return total
    return counts if total is None else total + counts


def expert_load_figures(window: Window, step: int, sink: MetricsSink) -> dict[str, float]:
    """All ranks' tokens per expert since the last logged step (to expert_load.jsonl), and how uneven the
    least balanced layer was: its busiest expert's tokens over the mean (1.0 is perfect balance; top-k of E
    experts can reach E / k) and its idlest's (0: an expert that got nothing). Every rank of an MoE model
    has counts, so every rank joins the collective."""
    counts = window.expert_tokens
    if counts is None:
        return {}
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    mean = counts.mean(dim=1).clamp(min=1e-9)
    sink.log_expert_load(step, counts.long().tolist())
    return {
        "expert_load_max_over_mean": float((counts.max(dim=1).values / mean).max()),
        "expert_load_min_over_mean": float((counts.min(dim=1).values / mean).min()),
    }


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
    extra: dict[str, float] | None = None,
) -> int:
    """Reduce the window over ranks, log it (with `extra` figures measured elsewhere, the same on every rank),
    reset it; returns the real tokens it held (all ranks)."""
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
    metrics.update(figure_means(dict(zip(names, totals[7:], strict=True)), targets))
    metrics.update(expert_load_figures(window, step, sink))
    if compiling_s > 0:
        metrics["compile_s"] = compiling_s
    if throughput is not None:
        metrics.update(throughput.figures(int(real), int(sum_sq_len), elapsed_s, world_size))
    scale = loss_scale(engine)
    if scale is not None:
        metrics["loss_scale"] = scale
    metrics.update(largest_over_ranks(memory_figures(engine.device), engine.device))
    metrics.update(straggler_figures(window, engine.device, metrics["step_time_s"], sink))
    metrics.update(extra or {})
    sink.log(step, metrics)
    window.reset()
    return int(real)
