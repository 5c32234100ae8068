"""Two nodes on one machine: two network namespaces joined by a veth pair, one no-ssh launcher in each.

Each namespace sees only its own end of the veth (10.231.N.1 and .2), so the ranks can reach each other only
over that link: gloo carries the training's collectives between the "nodes" exactly as between two hosts.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, SHORT_RUN_ARGS

pytestmark = pytest.mark.slow

SUBNET = f"10.231.{os.getpid() % 250}"


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


@pytest.fixture
def two_hosts():
    """Namespaces (name, address, interface) x 2, torn down afterwards even when the test fails."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        reason = "network namespaces need root and iproute2's `ip`"
        print(f"two-node test skipped: {reason}")
        pytest.skip(reason)
    tag = os.getpid() % 100000
    hosts = [(f"lms{tag}n{i}", f"{SUBNET}.{i + 1}", f"lmv{tag}{'ab'[i]}") for i in range(2)]
    try:
        steps = [
            *(("netns", "add", name) for name, _, _ in hosts),
            ("link", "add", hosts[0][2], "type", "veth", "peer", "name", hosts[1][2]),
        ]
        for name, address, interface in hosts:
            steps += [
                ("link", "set", interface, "netns", name),
                ("-n", name, "addr", "add", f"{address}/24", "dev", interface),
                ("-n", name, "link", "set", interface, "up"),
                ("-n", name, "link", "set", "lo", "up"),
            ]
        for step in steps:
            result = ip(*step)
            if result.returncode != 0:
                reason = f"ip {' '.join(step)} failed: {result.stderr.strip()}"
                print(f"two-node test skipped: {reason}")
                pytest.skip(reason)
        yield hosts
    finally:
        for name, _, _ in hosts:
            pids = ip("netns", "pids", name).stdout.split()
            if pids:
                subprocess.run(["kill", "-9", *pids], check=False)
            ip("netns", "del", name)  # takes its end of the veth pair with it


def wait_for(condition, timeout_s: float) -> None:
    """Poll `condition` until it holds or the time is up (the caller asserts what it needs)."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.2)


def test_two_namespace_nodes_train_the_same_model(two_hosts, tmp_path, cache_dir):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out = tmp_path / "run"
    master = two_hosts[0][1]
    jobs = []
    for rank, (namespace, _, interface) in enumerate(two_hosts):
        command = [
            "ip", "netns", "exec", namespace, "env", f"GLOO_SOCKET_IFNAME={interface}",
            sys.executable, "-m", "lmscale.cli", "launch", "--hostfile", str(hostfile),
            "--node-rank", str(rank), "--master-addr", master, "--master-port", "29613",
            f"output_dir={out}", f"data.cache_dir={cache_dir}", "zero.stage=2", "wandb.mode=disabled",
            "data.max_seq_len=64", "data.vocab_size=1024", "data.max_tokens_per_batch=1024",
            "train.max_steps=8", "schedule.warmup_steps=1", "train.eval_batches=2", "train.log_every=1",
        ]  # fmt: skip
        jobs.append(
            subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = [job.communicate(timeout=900)[0] for job in jobs]
    for job, output in zip(jobs, outputs, strict=True):
        assert job.returncode == 0, output[-3000:]
    # each node's ranks came from DeepSpeed's per-node launcher, started by lmscale as node 1 of the hostfile's 2
    assert "lmscale.jobs.node_launcher" in outputs[1] and "--node_rank=1" in outputs[1]
    # rank 0 compared both nodes' final weights (a SHA-256 over every parameter, gathered over the veth)
    assert "parameters identical on all 2 data-parallel replicas" in outputs[0], outputs[0][-3000:]
    assert (out / "checkpoints" / "step_00000008" / "COMPLETE").is_file()


def test_an_elastic_job_loses_a_node_goes_on_alone_and_takes_it_back(two_hosts, tmp_path, cache_dir):
    """Two torchrun agents (`lmscale launch --elastic 1:2`), one per namespace. The second node is lost
    mid-run (every process in it SIGKILLed): the first node's agent restarts its rank, which goes on alone from
    the newest checkpoint with the same global batch. Then the second node comes back: the agents stop the
    rank (it saves a checkpoint), and the job ends on both nodes. No person restarts anything."""
    out = tmp_path / "run"
    master = two_hosts[0][1]

    def start_node(index: int, fault: str | None = None) -> tuple[subprocess.Popen, Path]:
        namespace, _, interface = two_hosts[index]
        command = [
            "ip", "netns", "exec", namespace, "env", f"GLOO_SOCKET_IFNAME={interface}",
            *([f"LMSCALE_FAULT={fault}"] if fault else []),
            sys.executable, "-m", "lmscale.cli", "launch", "--elastic", "1:2", "--max-restarts", "1",
            "--last-call", "10", "--master-addr", master, "--master-port", "29614",
            f"output_dir={out}", f"data.cache_dir={cache_dir}", "zero.stage=2", *SHORT_RUN_ARGS,
            "train.max_steps=30", "checkpoint.save_every=4", "train.global_batch_size=32",
        ]  # fmt: skip
        log = tmp_path / f"node{index}-{len(list(tmp_path.glob('node*.log')))}.log"
        with log.open("w") as handle:
            return subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT), log

    def logged(log: Path, text: str) -> bool:
        return text in log.read_text()

    # The second node's rank stops after step 5, so that when the node is lost step 4 is the newest
    # checkpoint; the first node's rank is slower after its restart (0.1 s per batch), so that its time alone
    # is long enough to see and for the second node to come back in.
    first, first_log = start_node(0, "slow@data,restart=1")
    second, _ = start_node(1, "hang@step=5")
    rejoined = None
    try:
        complete = out / "checkpoints" / "step_00000004" / "COMPLETE"
        wait_for(lambda: complete.is_file() or first.poll() is not None, timeout_s=300)
        assert complete.is_file(), first_log.read_text()[-3000:]
        lost = ip("netns", "pids", two_hosts[1][0]).stdout.split()
        subprocess.run(["kill", "-9", *lost], check=True)  # the whole node at once: its agent and its rank
        second.wait()
        # The first node goes on alone ...
        wait_for(lambda: logged(first_log, "step 6/30") or first.poll() is not None, timeout_s=300)
        assert logged(first_log, "step 6/30"), first_log.read_text()[-3000:]
        # ... until the second node is back: its agent joins, and the agents restart the job on both.
        rejoined, rejoined_log = start_node(1)
        assert first.wait(timeout=300) == 0, first_log.read_text()[-4000:]
        assert rejoined.wait(timeout=60) == 0, rejoined_log.read_text()[-4000:]
    finally:
        for process in (first, second, rejoined):
            if process is not None:
                process.kill()
                process.wait()
    alone = first_log.read_text()
    both = alone + rejoined_log.read_text()  # rank 0 of the last start may be on either node
    # gloo reports the lost peer as a closed or a reset connection, whichever the survivor meets first
    lost = re.search(r"lost another rank of the job \(Connection (closed|reset) by peer", alone)
    assert lost, alone[-3000:]
    assert "elastic restart 1:" in alone and "the job had 2 rank(s), it has 1 now" in alone, alone[-3000:]
    assert "step_00000004 with 1 rank(s)" in alone and "1 rank(s) x 2 micro-batch(es)" in alone
    assert "received SIGTERM: saving a checkpoint" in alone  # torchrun stopping the rank for the newcomer
    assert "elastic restart: node(s) joined; the job had 1 rank(s), it has 2 now" in both, both[-3000:]
    assert "parameters identical on all 2 data-parallel replicas" in both, both[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if "loss" in r}
    assert sorted(steps) == list(range(1, 31))
    # the same global batch throughout: 2 x 1024-token micro-batches per step on one rank or two
    assert [steps[s]["tokens_seen"] for s in range(1, 31)] == [2048 * s for s in range(1, 31)]
    assert (out / "checkpoints" / "step_00000030" / "COMPLETE").is_file()
