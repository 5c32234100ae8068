"""How a rank of a job reports an error (lmscale.training.worker.main): a refused configuration once per node,
by its first rank (every rank of a job refuses the same config alike), any other error by the rank that met it."""

import pytest

from lmscale.errors import ConfigError, LmscaleError
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
