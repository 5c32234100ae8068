"""A per-rank hang watchdog: a rank on which no optimizer step completes in time dumps every thread's
stack into the run dir, says so in one line, and exits non-zero, so that SLURM's requeue or the user's
restart resumes from the last checkpoint instead of the job holding its allocation forever.

A rank stuck in a collective (its peer hung, or its node is gone) makes no progress either, so every
rank of a hung job ends. Two layers: a Python thread that writes the line and the stacks, and
`faulthandler.dump_traceback_later` as a backstop for a rank whose GIL is held by a stuck C call.
Written by hand: torch's NCCL watchdog covers NCCL only, and says nothing of where Python was.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from lmscale.checkpointing.rundir import RunDir
from lmscale.parallel import flight_recorder

log = logging.getLogger(__name__)

FLOOR_S = 900.0  # the automatic timeout is never shorter: first steps, slow evaluations, busy filesystems
STEP_TIME_FACTOR = 50  # automatic timeout: this many times the median step time, if longer than the floor
SAVE_FLOOR_S = 1800.0  # a checkpoint write to a slow shared filesystem may take long
BACKSTOP_S = 60.0  # faulthandler fires this much later than the Python thread
EXIT_CODE = 3


class HangWatchdog:
    """Call `beat(step, phase)` as work progresses; `stop()` at the end of training."""

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        timeout_s: float | None,
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        self.run_dir, self.rank, self.configured_s = run_dir, rank, timeout_s
        self.on_tick = on_tick or (lambda: None)  # e.g. the run lock's heartbeat
        self.step, self.phase = 0, "start-up"
        self.last_beat = time.monotonic()
        self.step_times: list[float] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="lmscale-hang-watchdog", daemon=True)

    def timeout_s(self) -> float:
        if self.configured_s is not None:
            base = self.configured_s
        else:
            typical = statistics.median(self.step_times[-20:]) if self.step_times else 0.0
            base = max(FLOOR_S, STEP_TIME_FACTOR * typical)
        return max(base, SAVE_FLOOR_S) if self.phase == "saving a checkpoint" else base

    def start(self) -> None:
        self._arm_backstop()
        self.thread.start()

    @property
    def dump_path(self) -> Path:
        return RunDir(self.run_dir).hang_dump(self.rank)

    def beat(self, step: int, phase: str) -> None:
        """Progress: `phase` is what the rank does next (for the report if it never ends)."""
        now = time.monotonic()
        if step > self.step and phase == "training step":
            self.step_times.append(now - self.last_beat)
        self.step, self.phase, self.last_beat = step, phase, now
        self._arm_backstop()

    def _arm_backstop(self) -> None:
        # To stderr (the job's log): faulthandler writes from C, without the GIL, and a file opened
        # for it ahead of time would be left empty by every run that did not hang.
        faulthandler.dump_traceback_later(self.timeout_s() + BACKSTOP_S, exit=True, file=sys.stderr)

    def _watch(self) -> None:
        interval = min(5.0, max(0.5, self.timeout_s() / 10))
        while not self.stopped.wait(interval):
            self.on_tick()
            stalled_s = time.monotonic() - self.last_beat
            if stalled_s > self.timeout_s():
                self._fire(stalled_s)

    def _fire(self, stalled_s: float) -> None:
        with self.dump_path.open("w", encoding="utf-8") as handle:
            handle.write(self.describe(stalled_s) + "\n\n")
            handle.flush()
            faulthandler.dump_traceback(file=handle, all_threads=True)
        print(
            f"lmscale: error: {self.describe(stalled_s)}; stacks in {self.dump_path}{self._collectives()}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_CODE)

    def _collectives(self) -> str:
        """The flight recorder's part of the report: where its dump is and the collective still waited in."""
        path = RunDir(self.run_dir).flight_recorder(self.rank)
        try:
            waiting = flight_recorder.dump(path)
        except Exception:  # the report must go out whatever the recorder does
            return ""
        if not path.is_file():
            return ""
        return f"; last collectives in {path}" + (f" (waiting in {waiting})" if waiting else "")

    def describe(self, stalled_s: float) -> str:
        return (
            f"rank {self.rank} on {socket.gethostname()} made no progress for {stalled_s:.0f} s after step "
            f"{self.step} ({self.phase}; timeout {self.timeout_s():.0f} s, train.hang_timeout_s): exiting so "
            "the job can be restarted from its last checkpoint"
        )

    def stop(self) -> None:
        self.stopped.set()
        faulthandler.cancel_dump_traceback_later()
