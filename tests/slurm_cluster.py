"""A real single-node SLURM cluster for the tests: munge + slurmctld + slurmd on this machine.

Debian's slurm-wlm runs here as root without systemd or cgroups (proctrack/linuxproc, task/none, no
accounting). `.ci/run` installs the packages; `start` returns None with the reason when the machine
cannot run SLURM, and the tests skip with that reason printed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

CONF = """\
ClusterName=lmscale-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
KillWait=60
JobRequeue=1
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    started: list[subprocess.Popen] = field(default_factory=list)
    munged_started: bool = False

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(command),
            capture_output=True,
            text=True,
            env={**os.environ, **self.env},
            check=check,
            timeout=60,
        )

    def queued(self, job_id: str) -> bool:
        return bool(self.state(job_id))

    def state(self, job_id: str) -> str:
        """The job's state as squeue shows it (PENDING, RUNNING, ...), or "" once it has left the queue."""
        return self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.strip()

    def stop(self) -> None:
        self.run("scancel", "--user=root", check=False)
        for process in self.started:
            process.terminate()
        for process in self.started:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        if self.munged_started:
            subprocess.run(["pkill", "-x", "munged"], check=False)
            _wait_for(lambda: not _munged_running(), 15)


def _missing_tools() -> list[str]:
    return [
        tool
        for tool in ("munged", "munge", "slurmctld", "slurmd", "sbatch", "squeue")
        if shutil.which(tool) is None
    ]


def _munge_answers() -> bool:
    return subprocess.run(["munge", "-n"], capture_output=True).returncode == 0


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(0.2)
    return True


def _munged_running() -> bool:
    return subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0


def _start_munge() -> bool:
    """Make munged answer; True if this call started it.

    Asks munge itself rather than looking for a process: a munged that an earlier cluster's stop() is
    still shutting down would otherwise be taken for a live one, and every daemon would fail to authenticate.
    """
    if _munge_answers():
        return False
    _wait_for(lambda: not _munged_running(), 15)
    key = Path("/etc/munge/munge.key")
    if not key.is_file():
        subprocess.run(["mungekey", "--create"], check=False, capture_output=True)
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    subprocess.run(["chown", "munge:munge", "/run/munge"], check=False, capture_output=True)
    subprocess.run(["munged", "--force"], check=False, capture_output=True)
    _wait_for(_munge_answers, 15)
    return True


def start(root: Path) -> tuple[SlurmCluster | None, str]:
    """A running cluster and "", or None and why SLURM cannot run here."""
    missing = _missing_tools()
    if missing:
        return None, f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return None, "slurmd must run as root here (no cgroups, no systemd)"
    for sub in ("state", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    host = socket.gethostname().split(".")[0]
    conf.write_text(
        CONF.format(
            host=host, root=root, cpus=os.cpu_count(), ctld_port=_free_port(), slurmd_port=_free_port()
        )
    )
    cluster = SlurmCluster(root=root, conf=conf, munged_started=_start_munge())
    for daemon in ("slurmctld", "slurmd"):
        cluster.started.append(
            subprocess.Popen(
                [daemon, "-D", "-f", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        )
    deadline = time.time() + 60
    while time.time() < deadline:
        state = cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
        if state in ("idle", "mixed", "allocated"):
            return cluster, ""
        time.sleep(1)
    logs = " | ".join(
        (root / name).read_text(errors="replace").strip().splitlines()[-1]
        for name in ("slurmctld.log", "slurmd.log")
        if (root / name).is_file() and (root / name).read_text(errors="replace").strip()
    )
    cluster.stop()
    return None, f"SLURM did not come up within 60 s (node state {state!r}; {logs})"
