"""Two nodes on one machine: two network namespaces joined by a veth pair, one no-ssh launcher in each.

Each namespace sees only its own end of the veth (10.231.N.1 and .2), so the ranks can reach each other only
over that link: gloo carries the training's collectives between the "nodes" exactly as between two hosts.
"""

import os
import shutil
import subprocess
import sys

import pytest
from helpers import REPO

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
    assert "--no_ssh --node_rank 1 --master_addr" in outputs[1].replace(
        " \\\n    ", " "
    )  # the line is folded
    # rank 0 compared both nodes' final weights (a SHA-256 over every parameter, gathered over the veth)
    assert "parameters identical on all 2 data-parallel replicas" in outputs[0], outputs[0][-3000:]
    assert (out / "checkpoints" / "step_00000008" / "COMPLETE").is_file()
