"""The `deepspeed` command lines `lmscale launch` builds."""

from lmscale.launch import LAUNCHER_SCRIPT, NodeLaunch, deepspeed_command


def test_one_node_command():
    command = deepspeed_command(2, "configs/tiny-cpu.yaml", ["zero.stage=2"], None, False, 29500)
    assert command[0].endswith("deepspeed")
    assert command[1:] == [
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
