"""One job per run directory: a lock file names the job that trains in it (host, pid, since when).

A second launch on the same output_dir, from this host or another node of a shared filesystem, stops
with one line naming the holder. A lock left by a process that died (SIGKILL, a lost node) does not
block: on the same host the holder's pid is checked, from another host the lock's heartbeat (its
mtime, touched by the holder every HEARTBEAT_S) must be recent. Under torchrun's elastic agent the lock names
the job too: its restarted ranks (perhaps on another node, the old rank 0's heartbeat still fresh) and a node
joining it are the same job, not a second one. Written by hand: `filelock`'s locks are
per process and do not say who holds them, and fcntl locks are unreliable on network filesystems.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from lmscale.checkpointing.rundir import RunDir
from lmscale.errors import ConfigError

HEARTBEAT_S = 60.0
STALE_AFTER_S = 5 * HEARTBEAT_S  # another host's lock not touched for this long is left over from a dead job


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    since: str
    job: str | None = (
        None  # torchrun's rendezvous id (TORCHELASTIC_RUN_ID), the same on every node and restart
    )

    def describe(self) -> str:
        return f"{self.host} (pid {self.pid}, since {self.since})"


def this_job() -> str | None:
    """The elastic job this process belongs to (torchrun sets it for its ranks; `lmscale launch --elastic`
    for its own checks), or None."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or None


def this_holder() -> Holder:
    since = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return Holder(socket.gethostname(), os.getpid(), since, this_job())


def read_holder(path: Path) -> Holder | None:
    try:
        return Holder(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None  # vanished, or cut by a crash while it was written


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return not is_zombie(pid)


def is_zombie(pid: int) -> bool:
    """A process that has died but not been reaped by its parent (a SIGKILLed job's rank, for a moment, or
    for good under a container init that never reaps): it still answers kill(pid, 0) but holds nothing."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # no /proc (macOS): kill(pid, 0) is all there is
    return stat.rpartition(")")[2].split()[0] == "Z"  # the state follows the parenthesised command name


def is_stale(path: Path, holder: Holder | None) -> bool:
    if holder is None:
        return True
    if holder.host == socket.gethostname():
        return not pid_alive(holder.pid)
    try:
        return time.time() - path.stat().st_mtime > STALE_AFTER_S
    except FileNotFoundError:
        return True


def check_unlocked(output_dir: Path) -> None:
    """Refuse an output_dir that a live job holds (reads only: safe on every rank, before any write)."""
    path = RunDir(output_dir).lock
    if not path.exists():
        return
    holder = read_holder(path)
    if holder is not None and holder.pid == os.getpid() and holder.host == socket.gethostname():
        return
    if holder is not None and holder.job is not None and holder.job == this_job():
        return  # an earlier start of this elastic job (the agents stop its ranks before restarting them)
    if not is_stale(path, holder):
        raise ConfigError(
            f"output_dir={output_dir} is in use by a run on {holder.describe()}: wait for it to end or stop it, "
            "or choose another output_dir"
        )


class RunLock:
    """The held lock of this job's output_dir (rank 0): acquire before writing, touch, release at the end."""

    def __init__(self, output_dir: Path) -> None:
        self.path = RunDir(output_dir).lock
        self.held = False

    def acquire(self) -> None:
        """Take the lock (creating output_dir: call it where the run's files are about to be written)."""
        holder = this_holder()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a second try after removing a stale lock
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                existing = read_holder(self.path)
                check_unlocked(self.path.parent)  # raises while its holder lives
                if existing == read_holder(self.path):  # no one else took it over meanwhile
                    self.path.unlink(missing_ok=True)
                continue
            try:
                with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                    json.dump(holder.__dict__, handle)
            except OSError as exc:  # a full disk: leave no empty lock behind, and name the file
                self.path.unlink(missing_ok=True)
                raise OSError(exc.errno, exc.strerror, str(self.path)) from None
            self.held = True
            return
        check_unlocked(self.path.parent)
        raise ConfigError(
            f"output_dir={self.path.parent}: could not take {self.path.name}; another job is starting there"
        )

    def touch(self) -> None:
        """The heartbeat that tells other hosts this lock's job is alive."""
        if self.held:
            try:
                os.utime(self.path)
            except FileNotFoundError:
                pass

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
