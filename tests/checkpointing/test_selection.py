"""Which checkpoint a run resumes from, what its manifest says, and how rank 0 completes and prunes them:
all on the filesystem alone (no DeepSpeed)."""

import json
import math

import pytest
from helpers import fake_checkpoint

from lmscale.checkpointing.checkpoint import (
    complete_checkpoint,
    complete_checkpoints,
    find_resume_checkpoint,
    mark_best,
    needs_universal,
    prune_checkpoints,
)
from lmscale.checkpointing.manifest import (
    checkpoint_damage,
    written_by,
    written_sequence_degree,
    written_tensor_degree,
)
from lmscale.checkpointing.rundir import RunDir
from lmscale.checkpointing.training_state import TrainingState
from lmscale.errors import ConfigError


def test_only_complete_checkpoints_count_and_the_others_are_named(tmp_path, caplog):
    run = tmp_path / "run"
    first, second = fake_checkpoint(run, 2, b"a"), fake_checkpoint(run, 10, b"b")
    (run / "checkpoints" / "step_00000012.partial").mkdir()  # a save that was cut short
    (run / "checkpoints" / "step_00000011").mkdir()  # renamed, marker not yet written
    (run / "checkpoints" / "notes").mkdir()  # not a checkpoint at all: ignored quietly
    with caplog.at_level("WARNING"):
        assert complete_checkpoints(run / "checkpoints") == [first, second]  # oldest first, by step
    assert caplog.text.count("skipping incomplete") == 2 and "notes" not in caplog.text
    assert find_resume_checkpoint(run, "auto") == second
    assert find_resume_checkpoint(run, "none") is None
    assert find_resume_checkpoint(tmp_path / "empty", "auto") is None


def test_a_checkpoint_named_by_path_must_exist_and_be_complete(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="does not exist: give a checkpoint directory, or use auto"):
        find_resume_checkpoint(run, str(run / "checkpoints" / "step_00000001"))
    partial = run / "checkpoints" / "step_00000003"
    partial.mkdir(parents=True)
    with pytest.raises(ConfigError, match="is not a complete lmscale checkpoint .*COMPLETE"):
        find_resume_checkpoint(run, str(partial))
    good = fake_checkpoint(run, 4, b"ok")
    assert find_resume_checkpoint(run, str(good)) == good


def test_the_manifest_names_a_missing_or_truncated_file_and_reads_old_size_only_markers(tmp_path):
    checkpoint = fake_checkpoint(tmp_path, 5, b"x" * 64)
    shard = checkpoint / "mp_rank_00_model_states.pt"
    assert checkpoint_damage(checkpoint) is None
    shard.write_bytes(b"x" * 10)
    assert checkpoint_damage(checkpoint) == "mp_rank_00_model_states.pt has 10 bytes of the 64 written"
    shard.unlink()
    assert checkpoint_damage(checkpoint) == "mp_rank_00_model_states.pt is missing"
    shard.write_bytes(b"y" * 64)  # an older marker: sizes alone, so same-size damage cannot show
    marker = RunDir.complete_marker(checkpoint)
    marker.write_text(json.dumps({"step": 5, "world_size": 1, "files": {shard.name: 64}}))
    assert checkpoint_damage(checkpoint) is None
    # Degrees the oldest markers did not record read as 1; a job's own are read back as written.
    assert (
        written_by(checkpoint),
        written_tensor_degree(checkpoint),
        written_sequence_degree(checkpoint),
    ) == (1, 1, 1)
    marker.write_text(json.dumps({"step": 5, "world_size": 8, "tensor": 2, "sequence": 4, "files": {}}))
    assert (
        written_by(checkpoint),
        written_tensor_degree(checkpoint),
        written_sequence_degree(checkpoint),
    ) == (8, 2, 4)


def test_partitioned_states_are_converted_only_when_the_layout_moved(tmp_path):
    checkpoint = fake_checkpoint(tmp_path, 1, b"z")
    marker = RunDir.complete_marker(checkpoint)
    marker.write_text(json.dumps({"step": 1, "world_size": 4, "tensor": 1, "files": {}}))
    assert not needs_universal(checkpoint, 4, zero_stage=2)  # same ranks
    assert needs_universal(checkpoint, 2, zero_stage=2)  # fewer ranks: ZeRO shards must be re-split
    assert not needs_universal(checkpoint, 2, zero_stage=0)  # ZeRO-0 states are whole on every rank
    assert needs_universal(checkpoint, 4, zero_stage=1, tensor=2)  # same ranks, another tensor split


def test_completing_renames_writes_the_manifest_moves_latest_and_prunes(tmp_path):
    run = RunDir(tmp_path / "run")
    old = [fake_checkpoint(run.root, step, b"o") for step in (1, 2, 3)]
    mark_best(run.root, 1)
    (run.checkpoints / "step_00000000.partial").mkdir()  # an earlier attempt's leftovers
    partial = run.checkpoints / "step_00000004.partial"
    partial.mkdir()
    (partial / "weights.pt").write_bytes(b"w" * 7)
    complete_checkpoint(partial, {"step": 4, "world_size": 1}, [("weights.pt", "d1g3st")], keep_last=2)
    final = run.checkpoints / "step_00000004"
    assert not partial.exists() and (final / "weights.pt").read_bytes() == b"w" * 7
    manifest = json.loads(RunDir.complete_marker(final).read_text())
    assert manifest == {
        "step": 4,
        "world_size": 1,
        "files": {"weights.pt": {"bytes": 7, "blake2b": "d1g3st"}},
    }
    assert run.latest.read_text() == "step_00000004"
    # The newest two stay, and the best (step 1) though it is older; step 2 and the leftovers go.
    assert [p.name for p in complete_checkpoints(run.checkpoints)] == [old[0].name, old[2].name, final.name]
    assert not (run.checkpoints / "step_00000000.partial").exists()
    prune_checkpoints(run.checkpoints, keep_last=1)
    assert [p.name for p in complete_checkpoints(run.checkpoints)] == [old[0].name, final.name]


def test_training_state_round_trips_through_the_client_state():
    planned = TrainingState(7, 7000, {"epoch": 0, "groups_done": 14}, 2.5)
    saved = planned.client_state()
    assert saved == {
        "step": 7,
        "tokens_seen": 7000,
        "data_position": {"epoch": 0, "groups_done": 14},
        "best_eval_loss": 2.5,
    }
    back = TrainingState.from_client_state(saved)
    assert back == planned and back.own_data_position() == planned.data_position  # ranks share rank 0's
    oldest = TrainingState.from_client_state({k: v for k, v in saved.items() if k != "best_eval_loss"})
    assert oldest.best_eval_loss == math.inf
    streamed = TrainingState.from_client_state(
        {**saved, "data_position": {"streaming": True, "positions": {"0": [0, 1, 2, 3]}}},
        rank_data_position={"streaming": True, "positions": {"0": [0, 5, 6, 7]}},
    )
    assert streamed.streamed and streamed.own_data_position()["positions"]["0"] == [0, 5, 6, 7]
    assert TrainingState.from_client_state(streamed.client_state()).own_data_position() == {}  # none saved
