"""`lmscale launch --elastic MIN:MAX`: one torchrun elastic agent per node instead of the deepspeed launcher.

The agents meet in torchrun's c10d rendezvous (its store lives in the agent on the node named by
--master-addr). When a rank or a node dies, the surviving agents restart their ranks, which resume from the
newest complete checkpoint on the ranks that remain (lmscale's N->M resume); a node that starts later joins at
the next restart. Rendezvous, restarts and keep-alives are torchrun's; only the command line is ours. (DeepSpeed's own
elastic agent is not an option: deepspeed 0.19.8 no longer ships its `deepspeed.elasticity` package.)
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from lmscale.errors import ConfigError

# torchrun's own default for how long a (re)start waits for more nodes once MIN have joined.
DEFAULT_LAST_CALL_S = 30
DEFAULT_MAX_RESTARTS = 3


@dataclass(frozen=True)
class ElasticNodes:
    """How many nodes the job may run on, how often it may restart, and how long a start waits for nodes."""

    min_nodes: int
    max_nodes: int
    max_restarts: int = DEFAULT_MAX_RESTARTS
    last_call_s: int = DEFAULT_LAST_CALL_S

    @classmethod
    def parse(cls, nodes: str, max_restarts: int | None, last_call_s: int | None) -> ElasticNodes:
        low, colon, high = nodes.partition(":")
        if not colon:
            low = high = nodes
        if not (low.isdigit() and high.isdigit()) or not 1 <= int(low) <= int(high):
            raise ConfigError(
                f"--elastic {nodes}: give MIN:MAX nodes with 1 <= MIN <= MAX (e.g. --elastic 1:2), or one count"
            )
        if max_restarts is not None and max_restarts < 0:
            raise ConfigError(f"--max-restarts {max_restarts} must be 0 or more")
        if last_call_s is not None and last_call_s < 1:
            raise ConfigError(f"--last-call {last_call_s} must be at least 1 second")
        return cls(
            int(low),
            int(high),
            DEFAULT_MAX_RESTARTS if max_restarts is None else max_restarts,
            DEFAULT_LAST_CALL_S if last_call_s is None else last_call_s,
        )

    def world_sizes(self, ranks_per_node: int) -> list[int]:
        """The rank counts the job can run with (the preflight checks the smallest and the largest)."""
        return sorted({self.min_nodes * ranks_per_node, self.max_nodes * ranks_per_node})


def is_local_address(host: str) -> bool:
    """Whether `host` is an address of this machine (or of this network namespace): binding to it succeeds.

    torchrun decides which agent hosts the rendezvous store by comparing the endpoint with the hostname's
    addresses, which misses secondary interfaces (a second NIC, a namespace's veth): then no agent hosts it
    and every node waits for the join timeout. lmscale tells torchrun instead (`is_host`)."""
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise ConfigError(
            f"--master-addr {host} does not resolve: fix the name, or give node 0's IP"
        ) from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.bind((address[0], 0))
                return True
            except OSError:
                continue
    return False


def address_towards(host: str, port: int) -> str:
    """This node's address on the route to `host` (no packet is sent: a UDP connect only picks the route).

    torchrun tells the other nodes to reach rank 0's store at its node's hostname by default, which may not be
    the address they can reach it by (a second network, a namespace); the address facing the rendezvous host is."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(address[:2])
        except OSError as exc:
            raise ConfigError(
                f"--master-addr {host} is unreachable from this node ({exc.strerror}): check the address and the "
                "network"
            ) from None
        return probe.getsockname()[0]


def torchrun_command(
    elastic: ElasticNodes,
    ranks_per_node: int,
    endpoint: tuple[str, int],
    worker: list[str],
) -> list[str]:
    """The torchrun command line that runs `worker` (the lmscale worker and its arguments) on this node."""
    host, port = endpoint
    conf = f"is_host={int(is_local_address(host))},last_call_timeout={elastic.last_call_s}"
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", f"{elastic.min_nodes}:{elastic.max_nodes}",
        "--nproc-per-node", str(ranks_per_node),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{host}:{port}", "--rdzv-id", job_id(endpoint),
        "--rdzv-conf", conf,
        "--local-addr", address_towards(host, port),
        "--max-restarts", str(elastic.max_restarts),
        *worker,
    ]  # fmt: skip


def job_id(endpoint: tuple[str, int]) -> str:
    """The elastic job's name, the same on every node (all run the same command) and at every restart: torchrun
    passes it to the ranks (TORCHELASTIC_RUN_ID), and the run directory's lock names it, so that restarted
    ranks and joining nodes are known as this job. While the job lives, no other can hold its rendezvous port."""
    host, port = endpoint
    return f"lmscale-{host}-{port}"


@contextmanager
def as_elastic_job(job: str) -> Iterator[None]:
    """This process counts as a member of elastic job `job` (what torchrun tells its ranks) while inside:
    the launcher's start checks then take the job's own run-directory lock for what it is."""
    before = os.environ.get("TORCHELASTIC_RUN_ID")
    os.environ["TORCHELASTIC_RUN_ID"] = job
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TORCHELASTIC_RUN_ID", None)
        else:
            os.environ["TORCHELASTIC_RUN_ID"] = before


def elastic_environment(ranks_per_node: int, has_gpu: bool) -> dict[str, str]:
    """The environment torchrun's agent needs from us.

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: each (re)start's ranks meet on a fresh store that rank 0 serves,
    instead of on the rendezvous store, which outlives restarts and still holds the previous ranks' addresses
    (with it, a restarted gloo group connects to dead ranks). A per-restart prefix on the shared store would
    not do across nodes: a node that joined later counts its restarts from 0.

    OMP_NUM_THREADS: torchrun gives every rank 1 thread when a node runs several; CPU ranks get their share
    of the node's cores instead, as under the deepspeed launcher (lmscale.parallel.engine.share_cpu_cores)."""
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    if not has_gpu and ranks_per_node > 1 and "OMP_NUM_THREADS" not in os.environ:
        import torch

        env["OMP_NUM_THREADS"] = str(max(1, torch.get_num_threads() // ranks_per_node))  # torch's core count
    return env
