"""The run object: resolved once, checked once, and settled values come back as a new Run."""

import pytest
from pydantic import ValidationError

from lmscale.checkpointing.rundir import RunDir, write_run_files
from lmscale.config import Config
from lmscale.errors import ConfigError
from lmscale.runs.run import StartChecks, open_run


def test_a_run_holds_the_layout_ranks_and_directory_its_config_names(tmp_path):
    out = tmp_path / "run"
    run = open_run(
        None,
        [f"output_dir={out}", "parallel.tensor=2", "model.preset=tiny-llama", "zero.stage=1"],
        world_size=4,
        has_gpu=False,
        rank=3,
        local_rank=1,
    )
    assert (run.layout.world_size, run.layout.tensor, run.layout.data) == (4, 2, 2)
    assert (run.rank, run.local_rank, run.data_rank, run.is_rank_zero) == (3, 1, 1, False)
    assert run.dir == RunDir(out) and run.device == "cpu"
    assert run.ds_config["train_micro_batch_size_per_gpu"] >= 1  # DeepSpeed's config, reconciled
    assert not out.exists()  # opening a run writes nothing


def test_a_settled_value_is_a_new_run_and_is_validated_again(tmp_path):
    run = open_run(
        None, [f"output_dir={tmp_path / 'r'}", "train.max_steps=null", "train.max_tokens=100000"], 1, False
    )
    settled = run.settled("train", max_steps=40, max_tokens=None)
    assert settled.config.train.max_steps == 40 and settled.config.train.max_tokens is None
    assert run.config.train.max_steps is None and run.config.train.max_tokens == 100000  # untouched
    assert settled.config.data is run.config.data  # the other sections are the same objects
    with pytest.raises(ValidationError):
        run.settled("train", max_steps=0)


def test_the_start_checks_run_once_and_only_where_asked(tmp_path):
    out = tmp_path / "run"
    write_run_files(Config(output_dir=str(out)), {}, out, forced=False)  # a run with another config
    changed = [f"output_dir={out}", "data.max_seq_len=64"]
    with pytest.raises(ConfigError, match="data.max_seq_len=64"):
        open_run(None, changed, 1, False)
    planned = open_run(None, changed, 1, False, checks=StartChecks.NONE)  # plan, dry run: nothing written
    assert planned.config.data.max_seq_len == 64
    forced = open_run(None, changed, 1, False, force=True)
    assert forced.force


def test_a_bad_config_fails_before_anything_is_resolved(tmp_path):
    with pytest.raises(ConfigError, match="model.preset"):
        open_run(None, [f"output_dir={tmp_path}", "model.preset=nope"], 1, False)
