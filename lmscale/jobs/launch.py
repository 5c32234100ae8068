"""Starting jobs: debug mode in this process, DeepSpeed's launchers for several ranks/nodes (its per-node
launcher for ranks on this node, lmscale.jobs.node_launcher; the `deepspeed` runner for a hostfile job over
ssh), or torchrun's elastic agent for a job that restarts itself (`--elastic`, lmscale.jobs.elastic).

The launcher glue is ours; process spawning, rendezvous and multi-node fan-out are DeepSpeed's (torchrun's).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from lmscale.errors import ConfigError
from lmscale.jobs.elastic import (
    ElasticNodes,
    as_elastic_job,
    elastic_environment,
    is_local_address,
    job_id,
    torchrun_command,
)
from lmscale.jobs.node_launcher import node_launcher_command
from lmscale.resources import resource

LAUNCHER_SCRIPT = resource("launcher/train.py")


HOSTFILE_LINE = re.compile(r"^\S+\s+slots=[1-9]\d*$")


def read_hostfile(path: Path) -> dict[str, int]:
    """A DeepSpeed hostfile as {host: slots}: `hostname slots=N` per line (# comments, blank lines allowed)."""
    if not path.is_file():
        raise ConfigError(f"hostfile {path} does not exist: give a file of 'host slots=N' lines")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ConfigError(f"hostfile {path} cannot be read ({exc.strerror}): fix its permissions") from None
    hosts: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if not HOSTFILE_LINE.match(text):
            raise ConfigError(
                f"hostfile {path} line {number} ({text!r}) is not 'host slots=N': fix that line"
            )
        host, slots = text.split()
        if host in hosts:
            raise ConfigError(f"hostfile {path} names a host twice: list each host once")
        hosts[host] = int(slots.split("=")[1])
    if not hosts:
        raise ConfigError(f"hostfile {path} names no hosts: add 'host slots=N' lines")
    return hosts


def _is_this_host(host: str) -> bool:
    return host in ("localhost", "127.0.0.1", socket.gethostname(), socket.gethostname().split(".")[0])


def check_reachable(hosts: list[str], timeout_s: float = 5.0) -> None:
    """Every other host resolves and accepts connections on the ssh port, or the launch would hang in ssh."""
    for host in hosts:
        if _is_this_host(host):
            continue
        try:
            address = socket.getaddrinfo(host, 22, type=socket.SOCK_STREAM)[0][4]
        except socket.gaierror:
            raise ConfigError(
                f"hostfile host {host} does not resolve: fix the name, or add it to /etc/hosts"
            ) from None
        try:
            with socket.create_connection(address[:2], timeout=timeout_s):
                pass
        except OSError as exc:
            raise ConfigError(
                f"hostfile host {host} is unreachable over ssh (port 22: {exc.strerror or 'timed out'}): check the "
                "host, or start one launcher per node without ssh (lmscale launch --node-rank I --master-addr A)"
            ) from None


def hostfile_devices(hosts: dict[str, int], nproc: int | None, hostfile: str) -> dict[str, list[int | str]]:
    """The device ids each host runs ranks on: --gpus-per-node per host if given, else each host's slots."""
    for host, slots in hosts.items():
        if nproc and nproc > slots:
            # DeepSpeed would start nproc ranks there anyway (--num_gpus overrides the slots).
            raise ConfigError(
                f"--gpus-per-node {nproc} is more than host {host}'s slots={slots} in {hostfile}: lower it, or "
                "raise the host's slots"
            )
    return {host: list[int | str](range(nproc or slots)) for host, slots in hosts.items()}


def no_ssh_node_devices(
    hosts: dict[str, int], nproc: int | None, hostfile: str, node_rank: int, has_gpu: bool
) -> dict[str, list[int | str]]:
    """`hostfile_devices` for one node of a no-ssh job: that node's ranks run on its own visible GPUs
    (`visible_device_ids`); the other nodes' lists only count their ranks."""
    devices = hostfile_devices(hosts, nproc, hostfile)
    host = list(hosts)[node_rank]
    asked = f"--gpus-per-node {nproc}" if nproc else f"host {host}'s slots={hosts[host]} in {hostfile}"
    devices[host] = visible_device_ids(len(devices[host]), has_gpu, asked)
    return devices


def local_devices(nproc: int, has_gpu: bool) -> dict[str, list[int | str]]:
    """This host's device ids for nproc ranks (`visible_device_ids`)."""
    return {"localhost": visible_device_ids(nproc, has_gpu, f"--gpus-per-node {nproc}")}


def visible_devices(has_gpu: bool) -> str:
    """CUDA_VISIBLE_DEVICES as this host's GPU ranks should honour it ("" when unset, or when ranks run on CPU)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES", "").strip() if has_gpu else ""


def visible_device_ids(count: int, has_gpu: bool, asked: str) -> list[int | str]:
    """The ids of the first `count` GPUs this process may use: CUDA_VISIBLE_DEVICES's when it is set (a
    scheduler's choice, e.g. SLURM's GPUs 4,5 on a shared node: the `deepspeed` runner would drop it and use
    devices 0..count-1, another job's), else 0..count-1. `asked` says where the count came from."""
    visible = visible_devices(has_gpu)
    if not visible:
        return list(range(count))
    ids: list[int | str] = [int(i) if i.strip().isdigit() else i.strip() for i in visible.split(",")]
    if count > len(ids):
        raise ConfigError(
            f"{asked} is more than the {len(ids)} GPU(s) CUDA_VISIBLE_DEVICES={visible} shows: lower it, or "
            "unset CUDA_VISIBLE_DEVICES"
        )
    return ids[:count]


def visible_devices_warning(has_gpu: bool) -> str | None:
    """For a hostfile job over ssh: CUDA_VISIBLE_DEVICES set here says nothing to the other hosts, and
    DeepSpeed's runner ignores it on every host (each runs its ranks on GPUs 0..N-1)."""
    visible = visible_devices(has_gpu)
    if not visible:
        return None
    return (
        f"CUDA_VISIBLE_DEVICES={visible} is ignored by a hostfile job over ssh (DeepSpeed's runner uses GPUs "
        "0..N-1 of every host): to run each node's ranks on its own visible GPUs, start one launcher per node "
        "with --node-rank I --master-addr NODE0"
    )


def check_port_free(port: int) -> None:
    """A rendezvous port already bound here would make rank 0 fail (or hang) after the launch."""
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            raise ConfigError(
                f"--master-port {port} is in use on this host: pick another port, or leave it out to get a free one"
            ) from None


@dataclass
class NodeLaunch:
    """One node of a multi-node job started by hand on each node (DeepSpeed's --no_ssh mode)."""

    node_rank: int
    master_addr: str


@dataclass
class Topology:
    """Where a job's ranks run: the device ids of each host, and either this node's place (ranks started
    here: on this host only, or one node of a no-ssh job) or None (a hostfile job fanned out over ssh)."""

    devices: dict[str, list[int | str]]
    node: NodeLaunch | None

    @property
    def world_size(self) -> int:
        return sum(len(ids) for ids in self.devices.values())


def deepspeed_command(
    nproc: int | None,
    config_path: str | None,
    overrides: list[str],
    hostfile: str | None,
    force: bool,
    master_port: int,
) -> list[str]:
    """The `deepspeed` command line that runs the lmscale worker on `nproc` ranks per node (what `lmscale
    launch` runs for a hostfile job over ssh; ranks it starts on its own node go through node_launcher)."""
    launcher = shutil.which("deepspeed")
    if launcher is None:
        raise ConfigError(
            "the `deepspeed` launcher is not on PATH: pip install deepspeed, or activate its environment"
        )
    # --log_level=error: the launcher's INFO lines (its base64 world info, CUDA_VISIBLE_DEVICES on a CPU host,
    # each rank's whole command line) say nothing lmscale's own lines do not; its errors still show.
    command = [launcher, "--log_level=error", "--master_port", str(master_port)]
    if nproc:
        command += ["--num_gpus", str(nproc)]
    if hostfile:
        command += ["--hostfile", hostfile]
    return command + worker_arguments(config_path, overrides, force, module_flag="--module")


def worker_arguments(
    config_path: str | None, overrides: list[str], force: bool, module_flag: str
) -> list[str]:
    """The lmscale worker and its arguments, as a launcher runs it on each rank: from a checkout, the same
    script users pass to `deepspeed` or `torchrun`; from an installed wheel, the module."""
    worker = [str(LAUNCHER_SCRIPT)] if LAUNCHER_SCRIPT.is_file() else [module_flag, "lmscale.training.worker"]
    if config_path:
        worker += ["--config", config_path]
    if force:
        worker.append("--force")
    return worker + list(overrides)


@dataclass(frozen=True)
class LaunchFlags:
    """`lmscale launch`'s flags: where the ranks run."""

    gpus_per_node: int | None = None
    hostfile: str | None = None
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    force: bool = False
    elastic: ElasticNodes | None = None


def launch_job(config_path: str | None, overrides: list[str], flags: LaunchFlags) -> int:
    """Check everything that can be checked before ranks start, once, then run the `deepspeed` launcher."""
    from lmscale.parallel.engine import free_port, has_gpu
    from lmscale.runs.preflight import launch_problems
    from lmscale.runs.run import open_run

    if flags.elastic is not None:
        return launch_elastic(config_path, overrides, flags)
    topology = launch_topology(flags, has_gpu())
    run = open_run(config_path, overrides, topology.world_size, has_gpu(), force=flags.force)
    problems = launch_problems(run.config, run.layout)
    if problems:
        raise ConfigError("; ".join(problems))
    if flags.master_port is not None and (topology.node is None or topology.node.node_rank == 0):
        check_port_free(flags.master_port)
    port = flags.master_port or free_port()
    if topology.node is None:
        if warning := visible_devices_warning(has_gpu()):
            print(f"lmscale: warning: {warning}", file=sys.stderr, flush=True)
        command = deepspeed_command(
            flags.gpus_per_node, config_path, overrides, flags.hostfile, flags.force, port
        )
    else:
        node = topology.node
        command = node_launcher_command(topology.devices, node.master_addr, port, node.node_rank)
        command += worker_arguments(config_path, overrides, flags.force, module_flag="--module")
    return run_launcher(command)


def launch_elastic(config_path: str | None, overrides: list[str], flags: LaunchFlags) -> int:
    """This node's torchrun agent, after the checks every launch makes, for the smallest and the largest
    job the nodes can form."""
    from lmscale.parallel.engine import has_gpu
    from lmscale.runs.preflight import launch_problems
    from lmscale.runs.run import StartChecks, open_run

    elastic, endpoint = elastic_topology(flags)
    ranks_per_node = flags.gpus_per_node or 1
    # This node may be joining the job when it runs already: the run directory's lock is then the job's own.
    with as_elastic_job(job_id(endpoint)):
        for world_size in elastic.world_sizes(ranks_per_node):
            # The run directory is checked once (a resume is found by the ranks at every restart).
            checks = (
                StartChecks.FULL if world_size == ranks_per_node * elastic.max_nodes else StartChecks.NONE
            )
            run = open_run(config_path, overrides, world_size, has_gpu(), checks=checks)
            problems = launch_problems(run.config, run.layout)
            if problems:
                raise ConfigError(f"with {world_size} rank(s): " + "; ".join(problems))
    worker = worker_arguments(config_path, overrides, force=False, module_flag="--module")
    command = torchrun_command(elastic, ranks_per_node, endpoint, worker)
    return run_launcher(command, elastic_environment(ranks_per_node, has_gpu()))


def elastic_topology(flags: LaunchFlags) -> tuple[ElasticNodes, tuple[str, int]]:
    """(the node counts, the rendezvous endpoint), with the flags that do not go with --elastic refused."""
    from lmscale.parallel.engine import free_port

    elastic = flags.elastic
    assert elastic is not None
    if flags.hostfile is not None or flags.node_rank is not None:
        raise ConfigError(
            "--elastic starts this node's agent only: drop --hostfile/--node-rank and run the same command on "
            "every node, with --master-addr naming the node that hosts the rendezvous"
        )
    if flags.force:
        # A restarted rank would replace the run it is meant to resume.
        raise ConfigError(
            "--force does not go with --elastic (every restart would start the run over): delete the output "
            "directory first, or choose another output_dir"
        )
    check_gpus_per_node(flags)
    if elastic.max_nodes > 1 and not (flags.master_addr and flags.master_port):
        raise ConfigError(
            f"--elastic {elastic.min_nodes}:{elastic.max_nodes} needs --master-addr and --master-port: the node "
            "that hosts the rendezvous (it must outlive the job) and a port, the same on every node"
        )
    host = flags.master_addr or "127.0.0.1"
    if flags.master_port is not None and is_local_address(host):
        check_port_free(flags.master_port)
    return elastic, (host, flags.master_port or free_port())


def check_gpus_per_node(flags: LaunchFlags) -> None:
    if flags.gpus_per_node is not None and flags.gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node {flags.gpus_per_node} must be at least 1")


def launch_topology(flags: LaunchFlags, has_gpu: bool) -> Topology:
    """Where the ranks run, with the hostfile and flags checked."""
    check_gpus_per_node(flags)
    if flags.hostfile is None:
        if flags.node_rank is not None:
            raise ConfigError("--node-rank needs --hostfile (the list of all nodes, the same file on each)")
        return Topology(local_devices(flags.gpus_per_node or 1, has_gpu), NodeLaunch(0, "127.0.0.1"))
    hosts = read_hostfile(Path(flags.hostfile))
    if flags.node_rank is None:
        check_reachable(list(hosts))
        return Topology(hostfile_devices(hosts, flags.gpus_per_node, flags.hostfile), None)
    if not 0 <= flags.node_rank < len(hosts) or not flags.master_addr:
        raise ConfigError(
            f"--node-rank {flags.node_rank} needs 0 <= rank < {len(hosts)} (the hostfile's hosts) and --master-addr"
        )
    devices = no_ssh_node_devices(hosts, flags.gpus_per_node, flags.hostfile, flags.node_rank, has_gpu)
    return Topology(devices, NodeLaunch(flags.node_rank, flags.master_addr))


def run_launcher(command: list[str], extra_env: dict[str, str] | None = None) -> int:
    """Run the launcher; on a machine with no GPU its ranks use DeepSpeed's CPU accelerator."""
    env = {**os.environ, **(extra_env or {})}
    env.setdefault("PYTHONUNBUFFERED", "1")
    print("lmscale: " + shell_lines(command), file=sys.stderr, flush=True)
    # Its own session (and process group), so a Ctrl-C at the terminal reaches only this process: DeepSpeed's
    # per-node launcher answers SIGINT by terminating every rank's process tree (data workers, W&B's
    # service) and killing it 30 s later, which loses the step. StopForwarder hands the ranks the
    # signal instead; they agree to stop, save a checkpoint together and exit 0.
    process = subprocess.Popen(command, env=env, start_new_session=True)
    with StopForwarder(process):
        return process.wait()


def shell_lines(command: list[str], width: int = 110) -> str:
    """The command as a shell would take it, folded into lines of about `width` with backslashes (a log
    keeps it readable; a copy still runs)."""
    lines, line = [], ""
    for word in map(shlex.quote, command):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = "    " + word
        else:
            line = f"{line} {word}" if line else word
    return " \\\n".join([*lines, line])


class StopForwarder:
    """While the launcher runs: a first SIGINT, SIGTERM, SIGUSR1 or SIGHUP goes to the ranks as their stop
    request; a second SIGINT (or a stop before any rank exists) ends the whole launch at once."""

    def __init__(self, launcher: subprocess.Popen) -> None:
        self.launcher = launcher
        self.forwarded = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopForwarder:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        ranks = rank_processes(self.launcher.pid)
        if (self.forwarded and signum == signal.SIGINT) or not ranks:
            print("lmscale: stopping the ranks now, without a checkpoint", file=sys.stderr, flush=True)
            _signal_group(self.launcher.pid, signal.SIGINT)
            return
        name = signal.Signals(signum).name
        # A closed terminal (SIGHUP) stops them too: in their own session, they would run on unseen.
        if signum == signal.SIGHUP:
            signum = signal.SIGTERM
        if not self.forwarded:
            print(
                f"lmscale: {name}: the ranks save a checkpoint at the end of this step and stop "
                "(Ctrl-C again stops them at once, without one)",
                file=sys.stderr,
                flush=True,
            )
        self.forwarded = True
        for rank in ranks:
            try:
                rank.send_signal(signum)
            except psutil.NoSuchProcess:
                pass


# The per-node launchers whose children are ranks: DeepSpeed's (under the `deepspeed` runner) and torchrun's
# elastic agent (which is the launched process itself).
RANK_PARENTS = ("deepspeed.launcher.launch", "lmscale.jobs.node_launcher", "torch.distributed.run")


def rank_processes(launcher_pid: int) -> list[psutil.Process]:
    """This node's ranks: the children of the per-node launcher. None when the ranks run elsewhere (a
    hostfile job over ssh)."""
    try:
        descendants = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    ranks = []
    for process in descendants:
        try:
            parent = process.parent()
            if parent is not None and any(name in " ".join(parent.cmdline()) for name in RANK_PARENTS):
                ranks.append(process)
        except psutil.Error:
            continue
    return ranks


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass
