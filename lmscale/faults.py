"""Fault hooks for lmscale's own fault tests: `LMSCALE_FAULT` makes a real fault happen at a chosen point.

Inert when the variable is unset (the hooks are a dictionary lookup). Its value is one or more faults
separated by `;`, each `KIND@WHEN` with comma-separated conditions:

- `hang@step=5,rank=1`: that rank sleeps forever after optimizer step 5 (a stuck collective, a dead node);
- `exit@step=5,rank=1`: that rank exits abruptly (`os._exit(1)`) after step 5;
- `enospc@save` (optionally `,step=4`, `,rank=0`): the checkpoint writer raises `OSError(ENOSPC)` after
  DeepSpeed has written its files, as a full disk would;
- `kill@save` (same conditions): the process SIGKILLs itself in the middle of writing a checkpoint;
- `slow@data,rank=1` (optionally `,step=N`): that rank's batches arrive 0.1 s late (a slow disk or data
  worker on one node: the straggler it makes is what `lmscale.training.stragglers` names).

A condition left out matches every value; `restart=0` limits a fault to a job's first start under torchrun's
elastic agent (the restarted ranks then go on). For developers only: not a user setting.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass

FAULT_VARIABLE = "LMSCALE_FAULT"
KINDS = ("hang", "exit", "enospc", "kill", "slow")
WHENS = ("step", "save", "data")
SLOW_DATA_S = 0.1


@dataclass(frozen=True)
class Fault:
    kind: str
    when: str  # "step" (after an optimizer step), "save" (inside the checkpoint writer), "data" (before a step's batches)
    step: int | None = None
    rank: int | None = None
    restart: int | None = None  # torchrun's restart count (0 on the first start, and outside torchrun)

    def matches(self, when: str, step: int, rank: int) -> bool:
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        return (
            self.when == when
            and (self.step is None or self.step == step)
            and (self.rank is None or self.rank == rank)
            and (self.restart is None or self.restart == restart)
        )


def parse_faults(text: str) -> list[Fault]:
    """`hang@step=5,rank=1;enospc@save` as Faults; a malformed entry is an error, not ignored."""
    faults = []
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        kind, _, spec = entry.partition("@")
        when, *conditions = spec.split(",")
        values: dict[str, int] = {}
        if when.startswith("step="):
            when, conditions = "step", [when, *conditions]
        for condition in conditions:
            key, _, value = condition.partition("=")
            if key not in ("step", "rank", "restart") or not value.isdigit():
                raise ValueError(f"{FAULT_VARIABLE}: bad condition {condition!r} in {entry!r}")
            values[key] = int(value)
        if kind not in KINDS or when not in WHENS:
            raise ValueError(
                f"{FAULT_VARIABLE}: {entry!r} is not KIND@step=N[,rank=R], KIND@save or KIND@data"
            )
        faults.append(Fault(kind, when, values.get("step"), values.get("rank"), values.get("restart")))
    return faults


def _active(when: str, step: int, rank: int) -> list[Fault]:
    text = os.environ.get(FAULT_VARIABLE)
    if not text:
        return []
    return [fault for fault in parse_faults(text) if fault.matches(when, step, rank)]


def _happen(fault: Fault) -> None:
    if fault.kind == "hang":
        while True:  # as a rank stuck in a collective, or on a node that is gone
            time.sleep(3600)
    if fault.kind == "exit":
        os._exit(1)
    if fault.kind == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if fault.kind == "slow":
        time.sleep(SLOW_DATA_S)
        return
    os.kill(os.getpid(), signal.SIGKILL)


def after_step(step: int, rank: int) -> None:
    """The loop's hook after each optimizer step."""
    for fault in _active("step", step, rank):
        _happen(fault)


def before_batches(step: int, rank: int) -> None:
    """The loop's hook while it waits for step `step`'s batches (inside the timed data wait)."""
    for fault in _active("data", step, rank):
        _happen(fault)


def while_saving(step: int, rank: int) -> None:
    """The checkpoint writer's hook, after DeepSpeed wrote its files and before the checkpoint is complete."""
    for fault in _active("save", step, rank):
        _happen(fault)
