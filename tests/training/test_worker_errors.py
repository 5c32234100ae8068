"""How a rank of a job reports an error (lmscale.training.worker.main): a refused configuration once per node,
by its first rank (every rank of a job refuses the same config alike), any other error by the rank that met it."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from lmscale.errors import ConfigError, LmscaleError
from lmscale.jobs.node_launcher import node_launcher_command
from lmscale.training import worker
from lmscale.training.worker import failed_job_line, main, says_the_error


@pytest.mark.parametrize(("local_rank", "lines"), [("0", 1), ("1", 0)])
def test_a_refused_config_is_said_once_per_node(tmp_path, capsys, monkeypatch, local_rank, lines):
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    code = main([f"output_dir={tmp_path / 'run'}", "model.preset=tiny-nothing", "wandb.mode=disabled"])
    assert code == 2
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lmscale: error:")]
    assert len(said) == lines
    assert all("model.preset='tiny-nothing' is unknown" in line for line in said)
    assert not (tmp_path / "run").exists()


def test_other_errors_are_said_by_every_rank_that_meets_them(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert says_the_error(LmscaleError("disk full on this node"))
    assert not says_the_error(ConfigError("parallel.expert=3 does not divide 4 experts"))


# Ranks refusing a config as a job's ranks do, the first one a second later than the other.
REFUSING_RANK = """
import os, sys, time
from lmscale.errors import ConfigError
from lmscale.training.worker import report
if os.environ["LOCAL_RANK"] == "0":
    time.sleep(1.5)
report(ConfigError("the config is refused"))
sys.exit(2)
"""


def test_the_refusal_is_said_even_when_another_rank_meets_it_first(tmp_path):
    """The launcher ends every rank once one exits with an error: the rank that stays silent waits for the
    first rank to have said it."""
    script = tmp_path / "rank.py"
    script.write_text(REFUSING_RANK)
    command = node_launcher_command({"localhost": [0, 1]}, "127.0.0.1", 29517, 0) + [str(script)]
    env = {"PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu", "PYTHONPATH": ":".join(sys.path)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2
    assert done.stderr.count("lmscale: error: the config is refused") == 1, done.stderr[-2000:]


class DyingItems(torch.utils.data.Dataset):
    """A dataset whose worker process is killed at its first item, as the out-of-memory killer does."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        os.kill(os.getpid(), signal.SIGKILL)
        return index


def test_a_dead_data_loading_worker_is_one_line_with_the_fix(capsys, monkeypatch):
    loader = torch.utils.data.DataLoader(DyingItems(), num_workers=1)
    with pytest.raises(RuntimeError) as failure:
        next(iter(loader))

    def failing_run(*args, **kwargs):
        raise failure.value

    monkeypatch.setattr(worker, "run", failing_run)
    assert main(["wandb.mode=disabled"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmscale: error: rank 0's data-loading worker (pid ")
    assert "out-of-memory killer" in lines[0] and "data.num_workers=0" in lines[0]
    assert lines[0].endswith("; then run the same command again to resume from the last checkpoint")
    assert (
        failed_job_line(RuntimeError("CUDA error: an illegal memory access")) is None
    )  # its traceback says it


@pytest.mark.parametrize(
    ("signal_name", "said"),
    [
        ("Killed", "(pid 71) was killed by SIGKILL, on a cluster most often the out-of-memory killer"),
        ("Bus error", "(pid 71) was killed by SIGBUS: shared memory (/dev/shm) ran out"),
        ("Segmentation fault", "(pid 71) was killed by signal Segmentation fault: set data.num_workers=0"),
    ],
)
def test_a_data_loading_worker_killed_by_a_signal_names_the_likely_cause(signal_name, said):
    """torch's words when it saw the signal (its SIGCHLD handler, torch/csrc/DataLoader.cpp)."""
    error = RuntimeError(f"DataLoader worker (pid 71) is killed by signal: {signal_name}. ")
    assert said in failed_job_line(error)
