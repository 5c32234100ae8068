"""Finding the slow rank. In synchronous training every rank's step takes as long as the slowest one's, so
step times cannot name it; what differs is each rank's *own* time: its wait for data and its forward passes,
the parts of a step no collective waits in under data parallelism (ZeRO-3's and tensor parallelism's
gathers do wait inside the forward pass, so there the figure is blurred, not wrong). Every log step the
ranks' own times are gathered, the slowest rank and its lag behind the others' median are logged
(`perf/straggler_rank`, `perf/straggler_lag`), and a rank that stays clearly slowest is named in a warning.

Hand-written: torch's flight recorder and DeepSpeed's comms logger show collectives, not which rank makes
the others wait for them.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lmscale.parallel.engine import ranks_per_node

# A rank is a straggler when it is this much behind the others' median for WINDOWS log windows in a row: a
# lag below both floors is noise (a garbage collection, one long batch).
STRAGGLER_WINDOWS = 3
MIN_LAG_S = 0.05
MIN_LAG_SHARE = 0.1  # of the step time


class ForwardClock:
    """Time spent in this rank's forward passes. On a GPU, kernels run after the Python call returns, so
    CUDA events bracket the work and are read once per log window (no synchronization per micro-batch)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.host_s = 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((start, end))
            return
        began = time.perf_counter()
        yield
        self.host_s += time.perf_counter() - began

    def take_s(self) -> float:
        """Seconds measured since the last call, and start again."""
        seconds = self.host_s
        if self.events:
            self.events[-1][1].synchronize()
            seconds += sum(start.elapsed_time(end) for start, end in self.events) / 1000.0
        self.host_s, self.events = 0.0, []
        return seconds


@dataclass(frozen=True)
class RankTimes:
    """One rank's own time per step over a log window."""

    data_wait_s: float
    forward_s: float

    @property
    def own_s(self) -> float:
        return self.data_wait_s + self.forward_s


@dataclass(frozen=True)
class Straggler:
    rank: int
    lag_s: float  # its own time per step minus the median of the other ranks'
    times: RankTimes
    others: RankTimes  # the other ranks' medians, part by part

    @property
    def late_data(self) -> bool:
        """Whether most of the lag is waiting for data (else it is the forward passes)."""
        return (self.times.data_wait_s - self.others.data_wait_s) >= (
            self.times.forward_s - self.others.forward_s
        )


def gather_rank_times(own: RankTimes, device: torch.device) -> list[RankTimes]:
    """Every rank's times, in rank order (one small all-reduce: each rank fills its own slots)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    slots = torch.zeros(2 * world, dtype=torch.float64, device=device)
    slots[2 * rank], slots[2 * rank + 1] = own.data_wait_s, own.forward_s
    dist.all_reduce(slots, op=dist.ReduceOp.SUM)
    values = slots.tolist()
    return [RankTimes(values[2 * r], values[2 * r + 1]) for r in range(world)]


def slowest(times: list[RankTimes]) -> Straggler:
    """The rank with the longest own time and how far it is behind the median of the other ranks (not of
    all: with two ranks that would halve the lag)."""
    rank = max(range(len(times)), key=lambda r: times[r].own_s)
    others = [t for r, t in enumerate(times) if r != rank]
    lag = times[rank].own_s - statistics.median(t.own_s for t in others)
    typical = RankTimes(
        statistics.median(t.data_wait_s for t in others), statistics.median(t.forward_s for t in others)
    )
    return Straggler(rank, lag, times[rank], typical)


def node_of(rank: int) -> int | None:
    """The node a rank runs on, when the launcher says how many ranks each node has."""
    per_node = ranks_per_node()
    return rank // per_node if per_node else None


@dataclass
class StragglerWatch:
    """Names a rank once it has been clearly slowest for STRAGGLER_WINDOWS log windows in a row."""

    streak_rank: int | None = None
    streak: int = 0
    warned: set[int] = field(default_factory=set)

    def observe(self, straggler: Straggler, step_time_s: float) -> str | None:
        """A warning to log, or None."""
        clear = straggler.lag_s > max(MIN_LAG_S, MIN_LAG_SHARE * step_time_s)
        if not clear:
            self.streak_rank, self.streak = None, 0
            return None
        self.streak = self.streak + 1 if straggler.rank == self.streak_rank else 1
        self.streak_rank = straggler.rank
        if self.streak < STRAGGLER_WINDOWS or straggler.rank in self.warned:
            return None
        self.warned.add(straggler.rank)
        return describe(straggler, self.streak, step_time_s)


def describe(straggler: Straggler, windows: int, step_time_s: float) -> str:
    node = node_of(straggler.rank)
    where = f"rank {straggler.rank}" + (f" (node {node})" if node is not None else "")
    mine, others = straggler.times, straggler.others
    cause = (
        "its data arrives late: check that node's disk, network share or data workers"
        if straggler.late_data
        else "its forward passes are slow: check that device's clocks, temperature and other processes on it"
    )
    return (
        f"straggler: {where} has been the slowest for {windows} log windows, {straggler.lag_s:.2f} s per step "
        f"behind the median of the others (steps take {step_time_s:.2f} s; data wait {mine.data_wait_s:.2f} s "
        f"against {others.data_wait_s:.2f} s, forward {mine.forward_s:.2f} s against {others.forward_s:.2f} s): "
        f"{cause}"
    )
