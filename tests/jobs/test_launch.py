"""The `deepspeed` command lines `lmscale launch` builds."""

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
