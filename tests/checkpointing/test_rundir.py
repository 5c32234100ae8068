"""The run directory's names and rules, without running anything."""

import json

import pytest

from lmscale.checkpointing.rundir import (
    RunDir,
    check_output_dir,
    holds_run,
    mark_finished,
    read_labels,
    truncate_metrics,
    write_labels,
    write_run_files,
)
from lmscale.config import Config, config_to_yaml
from lmscale.errors import ConfigError


def test_every_name_lives_under_the_run_and_checkpoint_pointers_under_checkpoints(tmp_path):
    run = RunDir(tmp_path / "run")
    names = [
        run.config,
        run.ds_config,
        run.metrics,
        run.tokenizer,
        run.labels,
        run.finished,
        run.wandb_run_id,
        run.tensorboard,
        run.slurm,
        run.lock,
        run.data_fingerprint,
        run.report,
        run.hang_dump(3),
    ]
    assert all(path.parent == run.root for path in names) and len({p.name for p in names}) == len(names)
    assert run.latest.parent == run.checkpoints == run.best.parent
    assert RunDir.complete_marker(run.checkpoints / "step_00000002").parent.name == "step_00000002"
    assert run.best_tag() is None
    run.checkpoints.mkdir(parents=True)
    run.best.write_text("step_00000004\n")
    assert run.best_tag() == "step_00000004"


def test_a_run_is_recognised_by_its_markers_and_protected(tmp_path):
    run = RunDir(tmp_path / "run")
    assert holds_run(run.root) == []
    check_output_dir(run.root, force=False, resume="none")  # nothing there yet
    run.root.mkdir()
    run.metrics.write_text("")
    assert holds_run(run.root) == ["metrics.jsonl"]
    with pytest.raises(
        ConfigError, match="already holds a run \\(metrics.jsonl\\) and checkpoint.resume=none"
    ):
        check_output_dir(run.root, force=False, resume="none")
    check_output_dir(run.root, force=True, resume="none")
    check_output_dir(run.root, force=False, resume="auto")


def test_forced_run_files_replace_the_old_run_and_a_resume_keeps_the_data_fingerprint(tmp_path):
    run = RunDir(tmp_path / "run")
    config = Config(output_dir=str(run.root))
    write_run_files(config, {"train_batch_size": 16}, run.root, forced=False)
    assert run.config.read_text() == config_to_yaml(config)
    assert json.loads(run.ds_config.read_text()) == {"train_batch_size": 16}
    assert json.loads(run.data_fingerprint.read_text()) == {}  # the embedded corpus has no files to watch
    run.data_fingerprint.write_text('{"kept": {}}')
    (run.checkpoints / "step_00000002").mkdir(parents=True)
    run.metrics.write_text('{"step": 1}\n')
    mark_finished(run.root, 2, "reached train.max_steps")
    write_run_files(config, {}, run.root, forced=False)  # a resume
    assert run.data_fingerprint.read_text() == '{"kept": {}}' and run.checkpoints.exists()
    assert not run.finished.exists()  # not finished until it says so again
    write_run_files(config, {}, run.root, forced=True)
    assert not run.checkpoints.exists() and not run.metrics.exists()
    assert json.loads(run.data_fingerprint.read_text()) == {}


def test_labels_round_trip_and_metrics_are_cut_back_to_the_checkpoint(tmp_path):
    write_labels(tmp_path, ["neg", "pos"])
    assert read_labels(tmp_path) == ["neg", "pos"]
    assert read_labels(tmp_path / "other") is None
    metrics = RunDir(tmp_path).metrics
    metrics.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')  # cut by a crash
    truncate_metrics(tmp_path, 2)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]
