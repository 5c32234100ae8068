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
"""

from __future__ import annotations

import base64
import json
import sys
import time

POLL_S = 0.05


def world_info(slots_by_host: dict[str, list[int | str]]) -> str:
    """The per-node launcher's --world_info: {host: device ids} as JSON in URL-safe base64, as the runner's
    `encode_world_info` writes it (not imported from deepspeed.launcher.runner: that would import DeepSpeed in
    the launching process, the cost this module exists to save)."""
    return base64.urlsafe_b64encode(json.dumps(slots_by_host).encode("utf-8")).decode("utf-8")


def node_launcher_command(
    slots_by_host: dict[str, list[int | str]], master_addr: str, master_port: int, node_rank: int
) -> list[str]:
    """The command that starts this node's ranks (the user's script and arguments go after it)."""
    return [
        sys.executable,
        "-u",
        "-m",
        __name__,
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


def run_deepspeed_node_launcher() -> None:
    """DeepSpeed's per-node launcher's main(), on this process's arguments, looking at its ranks every POLL_S."""
    from deepspeed.launcher import launch

    from lmscale.fast_exit import skip_final_collection

    # It imported torch (through DeepSpeed) and holds nothing to clean up: ~0.4 s of collection at exit saved.
    skip_final_collection()
    launch.time = QuickPollTime()
    launch.main()


if __name__ == "__main__":
    run_deepspeed_node_launcher()
