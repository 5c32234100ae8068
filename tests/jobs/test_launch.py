"""The command lines `lmscale launch` builds, and DeepSpeed's per-node launcher as lmscale runs it."""

import base64
import inspect
import json
import subprocess
import sys

import pytest

from lmscale.errors import ConfigError
from lmscale.jobs.launch import (
    LAUNCHER_SCRIPT,
    LaunchFlags,
    deepspeed_command,
    hostfile_devices,
    launch_topology,
    local_devices,
    visible_devices_warning,
)
from lmscale.jobs.node_launcher import hostfile_node_arguments, node_launcher_command, node_launcher_prefix


def test_a_hostfile_job_over_ssh_goes_through_the_deepspeed_runner():
    command = deepspeed_command(2, "configs/tiny-cpu.yaml", ["zero.stage=2"], "hosts", False, 29500)
    assert command[0].endswith("deepspeed")
    assert command[1:] == [
        "--log_level=error",
        "--master_port",
        "29500",
        "--num_gpus",
        "2",
        "--hostfile",
        "hosts",
        str(LAUNCHER_SCRIPT),
        "--config",
        "configs/tiny-cpu.yaml",
        "zero.stage=2",
    ]


def world_info_of(command: list[str]) -> dict:
    (encoded,) = [word.split("=", 1)[1] for word in command if word.startswith("--world_info=")]
    return json.loads(base64.urlsafe_b64decode(encoded))


def test_ranks_on_this_node_start_from_deepspeeds_per_node_launcher(tmp_path):
    """On this host only, and for one node of a no-ssh job, no `deepspeed` runner: the per-node launcher gets
    the device ids lmscale validated the config for."""
    topology = launch_topology(LaunchFlags(gpus_per_node=2), has_gpu=False)
    assert topology.world_size == 2 and topology.node.node_rank == 0
    command = node_launcher_command(topology.devices, "127.0.0.1", 29500, 0)
    assert command[1:4] == ["-u", "-m", "lmscale.jobs.node_launcher"]
    assert world_info_of(command) == {"localhost": [0, 1]}
    assert command[5:] == [
        "--master_addr=127.0.0.1",
        "--master_port=29500",
        "--node_rank=0",
        "--log_level=error",
    ]

    hosts = tmp_path / "hosts"
    hosts.write_text("node-a slots=4\nnode-b slots=4\n")
    flags = LaunchFlags(gpus_per_node=2, hostfile=str(hosts), node_rank=1, master_addr="10.1.2.3")
    topology = launch_topology(flags, has_gpu=True)
    assert topology.devices == {"node-a": [0, 1], "node-b": [0, 1]} and topology.world_size == 4
    assert (topology.node.node_rank, topology.node.master_addr) == (1, "10.1.2.3")


def test_device_ids_follow_cuda_visible_devices_and_hostfile_slots(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert local_devices(2, has_gpu=True) == {"localhost": [4, 5]}
    assert local_devices(2, has_gpu=False) == {"localhost": [0, 1]}  # CPU ranks have no devices to pick
    with pytest.raises(ConfigError, match="--gpus-per-node 4 is more than the 3 GPU"):
        local_devices(4, has_gpu=True)
    assert hostfile_devices({"a": 8, "b": 8}, None, "hosts") == {"a": list(range(8)), "b": list(range(8))}
    with pytest.raises(ConfigError, match="--gpus-per-node 8 is more than host b's slots=4 in hosts"):
        hostfile_devices({"a": 8, "b": 4}, 8, "hosts")


def test_a_job_over_ssh_says_that_it_cannot_use_the_visible_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert "CUDA_VISIBLE_DEVICES=4,5 is ignored by a hostfile job over ssh" in visible_devices_warning(True)
    assert visible_devices_warning(has_gpu=False) is None  # CPU ranks: nothing to pick
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_devices_warning(has_gpu=True) is None


def test_a_node_of_a_no_ssh_job_runs_its_ranks_on_its_own_visible_gpus(tmp_path, monkeypatch):
    """SLURM on a shared node gives a job GPUs 4,5 (CUDA_VISIBLE_DEVICES): the ranks must not take 0,1, which
    are another job's (what DeepSpeed's runner does with a hostfile, deepspeedai/DeepSpeed#7155)."""
    hosts = tmp_path / "hosts"
    hosts.write_text("node-a slots=2\nnode-b slots=2\n")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    flags = LaunchFlags(hostfile=str(hosts), node_rank=1, master_addr="node-a")
    assert launch_topology(flags, has_gpu=True).devices == {"node-a": [0, 1], "node-b": [4, 5]}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4")
    with pytest.raises(ConfigError, match="host node-b's slots=2 in .*hosts is more than the 1 GPU"):
        launch_topology(flags, has_gpu=True)


RANK_SCRIPT = """
import os, sys, time
print(f"rank {os.environ['RANK']}/{os.environ['WORLD_SIZE']} local {os.environ['LOCAL_RANK']} {sys.argv[1:]}")
sys.stdout.flush()
if os.environ["RANK"] == os.environ.get("FAIL_RANK"):
    sys.exit(3)
if "FAIL_RANK" in os.environ:
    time.sleep(600)  # ended by the launcher when the other rank fails
"""


def test_the_per_node_launcher_starts_each_rank_and_ends_the_job_on_a_failure(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    command = node_launcher_command({"localhost": [0, 1]}, "127.0.0.1", 29500, 0) + [str(script), "x=1"]
    env = {"PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu", "PYTHONPATH": ":".join(sys.path)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rank 0/2 local 0 ['--local_rank=0', 'x=1']" in done.stdout
    assert "rank 1/2 local 1 ['--local_rank=1', 'x=1']" in done.stdout

    failed = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**env, "FAIL_RANK": "1"}
    )
    assert failed.returncode == 3  # the sleeping rank 0 was ended, not waited for


def test_a_slurm_task_starts_its_nodes_ranks_from_the_hostfile_and_slurm_nodeid(tmp_path):
    """The sbatch script's form: `python -m lmscale.jobs.node_launcher --hostfile H ...`, node rank from srun."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    (tmp_path / "hosts").write_text("node-a slots=2\nnode-b slots=1\n")
    command = [*node_launcher_prefix(), "--hostfile", str(tmp_path / "hosts"), "--master_addr", "127.0.0.1"]
    env = {"PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu", "PYTHONPATH": ":".join(sys.path)}
    done = subprocess.run(
        [*command, str(script), "x=1"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "SLURM_NODEID": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    ranks = [line for line in done.stdout.splitlines() if line.startswith("rank ")]
    assert ranks == ["rank 2/3 local 0 ['--local_rank=0', 'x=1']"]  # node 1 of a (2 + 1)-rank job
    assert "lmscale: node 1 (node-b): 1 rank(s) on the CPU" in done.stderr.splitlines()
    alone = subprocess.run([*command, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert alone.returncode == 2
    assert alone.stderr.strip() == (
        "lmscale: error: --hostfile needs --node_rank N (or SLURM_NODEID, as srun sets it): add it"
    )


def test_a_slurm_nodes_ranks_take_the_gpus_slurm_gave_the_job(tmp_path, monkeypatch):
    (tmp_path / "hosts").write_text("node-a slots=2\nnode-b slots=2\n")
    hostfile = ["--hostfile", str(tmp_path / "hosts")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")
    monkeypatch.setenv("SLURM_NODEID", "1")
    arguments = hostfile_node_arguments([*hostfile, "--master_port", "29500", "train.py"], has_gpu=True)
    assert arguments[1:] == ["--node_rank=1", "--master_port", "29500", "train.py"]
    world = json.loads(base64.urlsafe_b64decode(arguments[0].removeprefix("--world_info=")))
    assert world == {"node-a": [0, 1], "node-b": [6, 7]}
    given = hostfile_node_arguments([*hostfile, "--node_rank", "0", "train.py"], has_gpu=False)
    assert given[1:] == ["--node_rank=0", "train.py"]
    assert json.loads(base64.urlsafe_b64decode(given[0].removeprefix("--world_info="))) == {
        "node-a": [0, 1],
        "node-b": [0, 1],
    }
    with pytest.raises(ConfigError, match="node rank 2 is not below the 2 host"):
        hostfile_node_arguments([*hostfile, "--node_rank=2", "train.py"], has_gpu=True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6")
    with pytest.raises(ConfigError, match="host node-b's slots=2 in .* is more than the 1 GPU"):
        hostfile_node_arguments([*hostfile, "train.py"], has_gpu=True)


def test_the_per_node_launchers_wait_between_looks_is_the_one_lmscale_shortens():
    """lmscale.jobs.node_launcher cuts the `time.sleep` of DeepSpeed's rank loop: a DeepSpeed that changes
    that loop must be looked at again."""
    from deepspeed.launcher import launch

    source = inspect.getsource(launch.main)
    assert "time.sleep(1)" in source and "process.poll()" in source
    assert source.count("time.sleep(") == 1


def test_cpu_ranks_on_one_host_share_its_cores(monkeypatch):
    import torch

    from lmscale.parallel import engine

    before = torch.get_num_threads()
    monkeypatch.setattr(engine, "has_gpu", lambda: False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_SIZE", str(before))  # DeepSpeed's launcher: as many ranks as cores
    try:
        assert engine.share_cpu_cores().startswith(f"1 torch thread(s) per rank, {before} rank(s) sharing")
        assert torch.get_num_threads() == 1
        torch.set_num_threads(before)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stands
        assert engine.share_cpu_cores() is None and torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def test_an_elastic_launch_is_a_torchrun_agent_per_node():
    from lmscale.jobs.elastic import ElasticNodes, torchrun_command

    elastic = ElasticNodes.parse("1:2", max_restarts=None, last_call_s=10)
    assert (elastic.min_nodes, elastic.max_nodes, elastic.max_restarts) == (1, 2, 3)
    assert elastic.world_sizes(4) == [4, 8]
    command = torchrun_command(elastic, 4, ("127.0.0.1", 29500), ["train.py", "zero.stage=2"])
    assert command[1:3] == ["-m", "torch.distributed.run"]
    text = " ".join(command)
    assert (
        "--nnodes 1:2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:29500 --rdzv-id lmscale-127.0.0.1-29500"
        in text
    )
    # this machine owns 127.0.0.1, so its agent hosts the rendezvous store; its ranks are reached there too
    assert "--rdzv-conf is_host=1,last_call_timeout=10 --local-addr 127.0.0.1 --max-restarts 3" in text
    assert text.endswith("train.py zero.stage=2")
    assert "is_host=0" in " ".join(torchrun_command(elastic, 1, ("192.0.2.1", 29500), []))  # TEST-NET-1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--elastic", "2:1"], "1 <= MIN <= MAX"),
        (["--elastic", "1:2"], "needs --master-addr and --master-port"),
        (["--elastic", "1", "--force"], "--force does not go with --elastic"),
        (["--elastic", "1:2", "--hostfile", "hosts", "--node-rank", "0"], "drop --hostfile/--node-rank"),
        (["--max-restarts", "2"], "go with --elastic MIN:MAX"),
        (["--elastic", "1", "--max-restarts", "-1"], "--max-restarts -1 must be 0 or more"),
        (["--elastic", "1", "--gpus-per-node", "0"], "--gpus-per-node 0 must be at least 1"),
        (["--gpus-per-node", "0"], "--gpus-per-node 0 must be at least 1"),
        (
            ["--elastic", "1:2", "--master-addr", "no-such-host.invalid", "--master-port", "29999"],
            "does not resolve",
        ),
    ],
)
def test_elastic_flags_that_cannot_work_are_one_line(flags, message, tmp_path, capsys):
    from lmscale.cli import main

    out = tmp_path / "run"
    assert main(["launch", *flags, f"output_dir={out}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0], error
    assert not out.exists()


def test_the_launchers_checks_import_neither_datasets_nor_transformers(tmp_path):
    """They run before any rank starts, on every launch: datasets and transformers cost it ~1.3 s of imports
    that only the ranks need (a model's config is read with transformers only for a split layout)."""
    script = (
        "import sys\n"
        "from lmscale.cli import main\n"
        f"code = main(['launch', '--gpus-per-node', '2', 'data.path={tmp_path}/missing.jsonl',"
        f" 'output_dir={tmp_path}/run'])\n"
        "print(code, sorted(m for m in ('datasets', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.split("\n")[0] == "2 []", done.stderr
    assert "missing.jsonl does not exist" in done.stderr
    assert not (tmp_path / "run").exists()
