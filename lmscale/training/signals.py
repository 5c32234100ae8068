"""Preemption: SIGTERM/SIGUSR1 (and a first Ctrl-C) ask every rank to stop at the next step boundary.

The stop is agreed over a CPU (gloo) process group, so checking it never waits on the GPU; all ranks
then save the same checkpoint together and exit 0. A second Ctrl-C exits at once.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from lmscale.data.batches import STOP_SIGNALS
from lmscale.parallel.engine import any_rank, cpu_group, rank

log = logging.getLogger(__name__)


class StopRequest:
    """Collects stop signals for this process and agrees on them with the other ranks."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)
        cpu_group()  # created here, while every rank is at the same point (agreeing on it uses it)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.signal_name is not None:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
        self.signal_name = name
        say = log.warning if rank() == 0 else log.debug  # every rank gets it: one line is enough
        say("received %s: saving a checkpoint at the end of this step, then stopping", name)

    def agreed(self) -> bool:
        """True on every rank once any rank has been asked to stop (a collective: call on all ranks)."""
        stop = any_rank(self.signal_name is not None)
        if stop and self.signal_name is None:
            self.signal_name = "a stop request on another rank"
        return stop
