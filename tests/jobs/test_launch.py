"""The `deepspeed` command lines `lmscale launch` builds."""

import pytest

from lmscale.jobs.launch import LAUNCHER_SCRIPT, NodeLaunch, deepspeed_command


def test_one_node_command():
    command = deepspeed_command(2, "configs/tiny-cpu.yaml", ["zero.stage=2"], None, False, 29500)
    assert command[0].endswith("deepspeed")
    assert command[1:] == [
        "--log_level=error",
        "--master_port",
        "29500",
        "--num_gpus",
        "2",
        str(LAUNCHER_SCRIPT),
        "--config",
        "configs/tiny-cpu.yaml",
        "zero.stage=2",
    ]


def test_no_ssh_node_of_a_multi_node_job_with_force():
    command = deepspeed_command(None, None, [], "hosts", True, 29501, NodeLaunch(1, "10.1.2.3"))
    assert command[1:] == [
        "--log_level=error",
        "--master_port",
        "29501",
        "--hostfile",
        "hosts",
        "--no_ssh",
        "--node_rank",
        "1",
        "--master_addr",
        "10.1.2.3",
        str(LAUNCHER_SCRIPT),
        "--force",
    ]


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
