"""The flight recorder's switch and the watchdog's reading of it: which collective a rank still waits in."""

import os
import time

from lmscale.parallel import flight_recorder
from lmscale.parallel.flight_recorder import waiting_in


def entry(seq, retired, name="gloo:all_reduce", age_s=0.0):
    created = time.time_ns() - int(age_s * 1e9)
    return {"collective_seq_id": seq, "retired": retired, "state": "scheduled", "profiling_name": name,
            "time_created_ns": created}  # fmt: skip


def test_the_oldest_collective_not_retired_is_the_one_waited_in():
    entries = [entry(1, True), entry(2, True), entry(3, False, "gloo:broadcast", 95), entry(4, False)]
    assert waiting_in(entries) == "gloo:broadcast #3, issued 95 s ago"
    assert waiting_in([entry(1, True)]) is None and waiting_in([]) is None


def test_switching_on_sets_the_buffer_and_keeps_a_users_own_settings(monkeypatch, tmp_path):
    for name in ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT",
                 "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    flight_recorder.switch_on(tmp_path / "nccl_rank")
    assert os.environ[flight_recorder.buffer_variable()] == flight_recorder.BUFFER_ENTRIES
    assert os.environ["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == str(tmp_path / "nccl_rank")
    assert not any(tmp_path.iterdir())  # nothing written before the run directory is
    monkeypatch.delenv(flight_recorder.buffer_variable())
    monkeypatch.setenv("TORCH_NCCL_TRACE_BUFFER_SIZE", "50")
    flight_recorder.switch_on(tmp_path / "nccl_rank")
    assert os.environ["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "50"
    assert not os.environ.get("TORCH_FR_BUFFER_SIZE")
