"""`train.profile_steps: [A, B]`: the torch profiler records steps A to B on every rank and writes one Chrome
trace per rank into the run directory (Perfetto, chrome://tracing and TensorBoard's profile plugin open it).

Only the chosen steps are recorded: profiling slows a step and a trace of a whole run would be gigabytes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class StepProfiler:
    """Starts the profiler before step A and writes the trace after step B (or at the run's last step, for a
    run that stops inside the range). A resumed run records the part of the range it runs."""

    def __init__(self, steps: tuple[int, int] | None, trace: Path | None) -> None:
        self.range = steps
        self.trace = trace
        self.profiler: torch.profiler.profile | None = None

    def before_step(self, step: int) -> None:
        if self.range is None or self.profiler is not None or not self.range[0] <= step <= self.range[1]:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities)
        self.profiler.start()
        self.first = step

    def after_step(self, step: int, last: bool = False) -> None:
        if self.profiler is None or (step < self.range[1] and not last):
            return
        self.profiler.stop()
        self.trace.parent.mkdir(parents=True, exist_ok=True)
        partial = self.trace.with_name(self.trace.name + ".partial")
        self.profiler.export_chrome_trace(str(partial))
        partial.replace(self.trace)  # a trace is whole or absent
        self.profiler = None
        log.info(
            "profile: steps %d-%d traced in %s (open it in https://ui.perfetto.dev)",
            self.first,
            step,
            self.trace,
        )
