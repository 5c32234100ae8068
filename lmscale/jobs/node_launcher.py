"""DeepSpeed's per-node launcher (`deepspeed.launcher.launch`), started by lmscale itself for a node whose ranks
it starts here, and run with a shorter look at its ranks.

For ranks on this host only, and for one node of a no-ssh job, the `deepspeed` runner in front of the
per-node launcher does nothing but work out the node's device ids and start it: a process that imports
DeepSpeed (and torch) for that, ~1.3 s before the ranks can start and ~0.5 s after they end. lmscale knows
the ids already (it validated the config for exactly those ranks), so it starts the per-node launcher itself.

The per-node launcher looks at its ranks once a second and then sleeps a second more, so the end of a job (or
a rank's failure) is seen up to 2 s late. Measured on a 2-rank CPU job of 2 steps: the ranks had exited
2.2 s before the launcher did. `python -m lmscale.jobs.node_launcher` runs DeepSpeed's own `main()` (same
arguments, same rank environment, same teardown of a failed job) with that sleep cut to POLL_S. It relies on
the loop's `time.sleep(1)` between looks, unchanged in DeepSpeed 0.15-0.19.8 (its source is checked by a
test, so a DeepSpeed that changes it is noticed).

Multi-node jobs over ssh still go through the `deepspeed` runner, which fans out with pdsh.

`--hostfile PATH` in place of `--world_info` (the SLURM batch script's form) makes this one node of a no-ssh
job: the device ids come from the hostfile's slots, this node's from CUDA_VISIBLE_DEVICES when it is set (the
GPUs the scheduler gave the job; DeepSpeed's runner would use 0..slots-1, on a shared node another job's,
deepspeedai/DeepSpeed#7155), and the node rank from --node_rank or, under srun, SLURM_NODEID.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from pathlib import Path

POLL_S = 0.05


def world_info(slots_by_host: dict[str, list[int | str]]) -> str:
    """The per-node launcher's --world_info: {host: device ids} as JSON in URL-safe base64, as the runner's
    `encode_world_info` writes it (not imported from deepspeed.launcher.runner: that would import DeepSpeed in
    the launching process, the cost this module exists to save)."""
    return base64.urlsafe_b64encode(json.dumps(slots_by_host).encode("utf-8")).decode("utf-8")


def node_launcher_prefix() -> list[str]:
    """The per-node launcher as a command, before its arguments."""
    return [sys.executable, "-u", "-m", __name__]


def node_launcher_command(
    slots_by_host: dict[str, list[int | str]], master_addr: str, master_port: int, node_rank: int
) -> list[str]:
    """The command that starts this node's ranks (the user's script and arguments go after it)."""
    return [
        *node_launcher_prefix(),
        f"--world_info={world_info(slots_by_host)}",
        f"--master_addr={master_addr}",
        f"--master_port={master_port}",
        f"--node_rank={node_rank}",
        # Its INFO lines (the world info, each rank's command line) say nothing lmscale's own lines do not.
        "--log_level=error",
    ]


class QuickPollTime:
    """The `time` module as DeepSpeed's per-node launcher sees it, with the wait between its looks at the
    ranks cut to POLL_S (its only sleep; its other uses of `time` pass through)."""

    def __getattr__(self, name: str):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, POLL_S))


def hostfile_node_arguments(argv: list[str], has_gpu: bool) -> list[str]:
    """`--hostfile PATH [--node_rank N] ...` as the per-node launcher's own arguments: `--world_info` with this
    node's visible GPUs, and `--node_rank` (SLURM_NODEID when not given)."""
    from lmscale.errors import ConfigError
    from lmscale.jobs.launch import no_ssh_node_devices, read_hostfile

    path = argv[1]
    node_rank, rest = _node_rank(argv[2:])
    hosts = read_hostfile(Path(path))
    if not 0 <= node_rank < len(hosts):
        raise ConfigError(
            f"node rank {node_rank} is not below the {len(hosts)} host(s) in {path}: fix the hostfile"
        )
    devices = no_ssh_node_devices(hosts, None, path, node_rank, has_gpu)
    host = list(hosts)[node_rank]
    where = f"GPU(s) {','.join(map(str, devices[host]))}" if has_gpu else "the CPU"
    print(f"lmscale: node {node_rank} ({host}): {len(devices[host])} rank(s) on {where}", file=sys.stderr)
    return [f"--world_info={world_info(devices)}", f"--node_rank={node_rank}", *rest]


def _node_rank(arguments: list[str]) -> tuple[int, list[str]]:
    """(the node rank: --node_rank's, else SLURM_NODEID's; the arguments without --node_rank)."""
    from lmscale.errors import ConfigError

    for index, argument in enumerate(arguments):
        if argument.startswith("--node_rank="):
            value, rest = argument.split("=", 1)[1], arguments[:index] + arguments[index + 1 :]
        elif argument == "--node_rank" and index + 1 < len(arguments):
            value, rest = arguments[index + 1], arguments[:index] + arguments[index + 2 :]
        else:
            continue
        if not value.isdigit():
            raise ConfigError(f"--node_rank {value} is not a number: give the node's index in the hostfile")
        return int(value), rest
    slurm_node = os.environ.get("SLURM_NODEID", "")
    if not slurm_node.isdigit():
        raise ConfigError("--hostfile needs --node_rank N (or SLURM_NODEID, as srun sets it): add it")
    return int(slurm_node), arguments


def run_deepspeed_node_launcher() -> None:
    """DeepSpeed's per-node launcher's main(), on this process's arguments, looking at its ranks every POLL_S."""
    from deepspeed.launcher import launch

    from lmscale.fast_exit import skip_final_collection

    # It imported torch (through DeepSpeed) and holds nothing to clean up: ~0.4 s of collection at exit saved.
    skip_final_collection()
    launch.time = QuickPollTime()
    launch.main()


def main() -> int:
    if sys.argv[1:2] and sys.argv[1].startswith("--hostfile="):  # the same as `--hostfile PATH`
        sys.argv[1:2] = sys.argv[1].split("=", 1)
    if sys.argv[1:2] == ["--hostfile"]:
        from lmscale.errors import ConfigError
        from lmscale.parallel.engine import has_gpu

        try:
            sys.argv[1:] = hostfile_node_arguments(sys.argv[1:], has_gpu())
        except ConfigError as exc:
            print(f"lmscale: error: {exc}", file=sys.stderr)
            return exc.exit_code
    run_deepspeed_node_launcher()
    return 0


if __name__ == "__main__":
    sys.exit(main())
