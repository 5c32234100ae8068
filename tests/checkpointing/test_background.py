"""The background checkpoint writer (checkpoint.async): what it writes, when it says it is done, and what
a failed write leaves."""

from collections import OrderedDict

import pytest
import torch

from lmscale.checkpointing.background import (
    BackgroundFiles,
    BackgroundWriter,
    StagingCheckpointEngine,
    host_copy,
)
from lmscale.checkpointing.manifest import file_digest
from lmscale.faults import FAULT_VARIABLE


class _Scaler:  # an object in a state dict, as DeepSpeed's loss scaler is
    def __init__(self):
        self.scale = torch.tensor(8.0)


def test_the_snapshot_is_taken_when_handed_over_not_when_written():
    weights, scaler = torch.arange(6.0), _Scaler()
    live = OrderedDict(
        w=weights, groups=[{"params": [0, 1], "lr": 0.1}], scaler=scaler, shape=torch.Size([6])
    )
    copied = host_copy(live)
    weights.add_(100)  # the next optimizer step changes the live tensors in place
    scaler.scale.mul_(2)
    live["groups"][0]["lr"] = 0.2
    assert type(copied) is OrderedDict and torch.equal(copied["w"], torch.arange(6.0))
    assert copied["scaler"].scale.item() == 8.0 and copied["groups"][0]["lr"] == 0.1


def test_the_writer_writes_in_order_checksums_from_memory_and_says_when_done(tmp_path):
    writer = BackgroundWriter()
    partial = tmp_path / "step_00000002.partial"
    (partial / "sub").mkdir(parents=True)
    writer.begin(2, partial, rank=0)
    files = BackgroundFiles(writer)
    files.save_object({"x": torch.ones(3)}, partial / "rng_rank0.pt")
    files.write_bytes(partial / "sub" / "data_rank0.json", b'{"epoch": 1}')
    assert not writer.current.sealed  # not done until the checkpoint's last file is handed over
    files.finish(2, 0)
    writer.wait()
    assert writer.done() and writer.current.failure is None
    assert sorted(writer.current.digests) == [
        ("rng_rank0.pt", file_digest(partial / "rng_rank0.pt")),
        ("sub/data_rank0.json", file_digest(partial / "sub" / "data_rank0.json")),
    ]
    assert torch.equal(torch.load(partial / "rng_rank0.pt", weights_only=True)["x"], torch.ones(3))


def test_a_failed_write_is_kept_for_the_agreement_and_the_rest_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_VARIABLE, "enospc@save,step=4")
    writer = BackgroundWriter()
    partial = tmp_path / "step_00000004.partial"
    partial.mkdir()
    writer.begin(4, partial, rank=1)
    writer.submit(partial / "a.pt", b"a" * 10)
    writer.submit(partial / "b.pt", b"b" * 10)
    writer.seal()
    writer.wait()  # done, with the failure recorded, so every rank can agree and remove the directory
    assert writer.current.failure is not None and "No space left" in str(writer.current.failure)
    assert (partial / "a.pt").is_file() and not (partial / "b.pt").exists()


def test_a_second_checkpoint_starts_only_after_the_first_is_written(tmp_path):
    writer = BackgroundWriter()
    for step in (2, 4):
        partial = tmp_path / f"step_{step:08d}.partial"
        partial.mkdir()
        writer.begin(step, partial, rank=0)
        writer.submit(partial / "model.pt", bytes(1 << 20))
        writer.seal()
    writer.wait()
    assert (
        writer.current.step == 4
        and (tmp_path / "step_00000002.partial" / "model.pt").stat().st_size == 1 << 20
    )


def test_deepspeeds_save_goes_through_the_writer_and_its_load_is_the_engines_own(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    writer = BackgroundWriter()
    engine = StagingCheckpointEngine(TorchCheckpointEngine(None), writer)
    writer.begin(6, tmp_path, rank=0)
    engine.save({"module": torch.ones(2)}, str(tmp_path / "mp_rank_00_model_states.pt"))
    writer.seal()
    writer.wait()
    assert torch.equal(engine.load(str(tmp_path / "mp_rank_00_model_states.pt"))["module"], torch.ones(2))
    assert engine.commit(None) is True  # complete only when every rank agrees: not DeepSpeed's commit
    assert not engine.is_decoupled() and engine.is_data_parallel_writer(0)  # the rest is DeepSpeed's


@pytest.mark.parametrize("value", ["true", "false"])
def test_checkpoint_async_is_spelled_as_users_write_it(value):
    from lmscale.config.loading import config_to_yaml, load_config

    config, _ = load_config(None, [f"checkpoint.async={value}"])
    assert config.checkpoint.async_save is (value == "true")
    assert f"async: {value}" in config_to_yaml(config)  # the run's saved config reads back


def test_a_background_prune_moves_old_checkpoints_aside_at_once_and_deletes_them_later(tmp_path):
    import threading

    from helpers import fake_checkpoint

    from lmscale.checkpointing.checkpoint import complete_checkpoints, prune_checkpoints

    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step, b"x" * 100)
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step_00000008.partial").mkdir()  # a crashed attempt's leftovers
    (checkpoints / "step_00000001.deleting").mkdir()
    before = set(threading.enumerate())
    prune_checkpoints(checkpoints, keep_last=2, in_background=True)
    # at once: the old one is no checkpoint any more, and nothing is mistaken for one
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["step_00000004", "step_00000006"]
    assert not (checkpoints / "step_00000002").exists()
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=30)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000004", "step_00000006"]
