"""How a rank of a job reports an error (lmscale.training.worker.main): a refused configuration once per node,
by its first rank (every rank of a job refuses the same config alike), any other error by the rank that met it."""

import subprocess
import sys

import pytest

from lmscale.errors import ConfigError, LmscaleError
from lmscale.jobs.node_launcher import node_launcher_command
from lmscale.training.worker import main, says_the_error


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
