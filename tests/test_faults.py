"""Faults a long job meets, each made to really happen: a hung rank, a full disk, a corrupt checkpoint,
a second launch on a live run, data edited under a run (the multi-process ones are in test_fault_runs.py)."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from helpers import fake_checkpoint

from lmscale import cli
from lmscale.checkpointing.checkpoint import find_resume_checkpoint
from lmscale.checkpointing.rundir import RunDir
from lmscale.checkpointing.runlock import STALE_AFTER_S, RunLock, check_unlocked, is_zombie
from lmscale.config import Config, config_to_yaml
from lmscale.data.fingerprint import changed_data, data_fingerprint
from lmscale.errors import ConfigError, LmscaleError
from lmscale.faults import Fault, parse_faults


@pytest.fixture(autouse=True)
def _environment(restore_environment):
    """Every test here runs commands in-process (see conftest.restore_environment)."""


def test_fault_hooks_parse_and_refuse_typos():
    assert parse_faults("hang@step=5,rank=1; enospc@save") == [
        Fault("hang", "step", 5, 1),
        Fault("enospc", "save", None, None),
    ]
    assert parse_faults("kill@save,step=4") == [Fault("kill", "save", 4, None)]
    assert parse_faults("slow@data,rank=1") == [Fault("slow", "data", None, 1)]
    assert Fault("exit", "step", 5, 1).matches("step", 5, 1) and not Fault("exit", "step", 5, 1).matches(
        "step", 5, 0
    )
    first_start_only = parse_faults("exit@step=5,rank=1,restart=0")[0]
    assert first_start_only == Fault("exit", "step", 5, 1, restart=0)
    assert first_start_only.matches("step", 5, 1)  # outside torchrun a job is on its first start
    os.environ["TORCHELASTIC_RESTART_COUNT"] = "1"  # the elastic agent's restarted ranks go on
    assert not first_start_only.matches("step", 5, 1) and Fault("exit", "step", 5, 1).matches("step", 5, 1)
    for bad in ("hang@step=five", "explode@save", "hang@later", "kill@save,node=1"):
        with pytest.raises(ValueError, match="LMSCALE_FAULT"):
            parse_faults(bad)


@pytest.fixture
def live_process():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield process
    process.kill()
    process.wait()


def write_lock(output_dir, host, pid, age_s=0.0):
    output_dir.mkdir(parents=True, exist_ok=True)
    path = RunDir(output_dir).lock
    path.write_text(json.dumps({"host": host, "pid": pid, "since": "2026-11-29T10:00:00+00:00"}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def test_a_live_holder_blocks_and_a_dead_one_does_not(tmp_path, live_process):
    run = tmp_path / "run"
    write_lock(run, socket.gethostname(), live_process.pid)
    with pytest.raises(
        ConfigError, match=f"in use by a run on {socket.gethostname()} \\(pid {live_process.pid}, since"
    ):
        check_unlocked(run)
    with pytest.raises(ConfigError, match="in use by a run"):
        RunLock(run).acquire()
    live_process.kill()
    live_process.wait()
    lock = RunLock(run)
    lock.acquire()  # the holder died (SIGKILL): its lock is left over, not a live job
    assert json.loads(RunDir(run).lock.read_text())["pid"] == os.getpid()
    lock.release()
    assert not RunDir(run).lock.exists()


def test_a_killed_holder_not_yet_reaped_does_not_block(tmp_path, live_process):
    """A SIGKILLed rank stays a zombie until its parent reaps it (under some container inits, for good):
    it answers kill(pid, 0) but holds nothing, so its lock is stale."""
    run = tmp_path / "run"
    write_lock(run, socket.gethostname(), live_process.pid)
    live_process.kill()  # not reaped: this test process is its parent and has not waited yet
    deadline = time.time() + 30
    while not is_zombie(live_process.pid) and time.time() < deadline:
        time.sleep(0.05)
    assert is_zombie(live_process.pid)
    check_unlocked(run)  # no error


def test_another_hosts_lock_blocks_while_its_heartbeat_is_fresh(tmp_path):
    run = tmp_path / "run"
    write_lock(run, "node-7", 12345, age_s=10)
    with pytest.raises(ConfigError, match="node-7 \\(pid 12345"):
        check_unlocked(run)
    write_lock(run, "node-7", 12345, age_s=STALE_AFTER_S + 60)  # its job died with its node
    check_unlocked(run)


def test_a_second_launch_on_a_live_run_writes_nothing(tmp_path, live_process, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(config_to_yaml(Config(output_dir=str(run))))
    write_lock(run, socket.gethostname(), live_process.pid)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*"))
    for command in (["train"], ["launch", "--gpus-per-node", "2"]):
        code = cli.main([*command, f"output_dir={run}"])
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lmscale: error:")]
        assert code == 2 and len(errors) == 1 and f"pid {live_process.pid}" in errors[0], errors
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*")) == before


def test_a_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    run = tmp_path / "run"
    older, newest = fake_checkpoint(run, 2, b"a" * 100), fake_checkpoint(run, 4, b"b" * 100)
    assert find_resume_checkpoint(run, "auto") == newest
    shard = newest / "mp_rank_00_model_states.pt"
    shard.write_bytes(b"b" * 50 + b"X" + b"b" * 49)  # bits changed, size the same
    with caplog.at_level("WARNING"):
        assert find_resume_checkpoint(run, "auto") == older
    assert "step_00000004 is damaged" in caplog.text and "does not match the checksum" in caplog.text
    assert "trying step_00000002" in caplog.text
    with pytest.raises(
        LmscaleError, match="is damaged: mp_rank_00_model_states.pt does not match the checksum"
    ):
        find_resume_checkpoint(run, str(newest))  # asked for by name: no silent substitute
    (older / "mp_rank_00_model_states.pt").write_bytes(b"a" * 10)  # truncated
    with pytest.raises(LmscaleError, match="no older one is intact: restore it, or pass --force"):
        find_resume_checkpoint(run, "auto")


def test_data_edited_in_place_is_named_and_force_starts_over(tmp_path, capsys):
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i} " * 8}) + "\n" for i in range(40)))
    run = tmp_path / "run"
    run.mkdir()
    config = Config.model_validate({"output_dir": str(run), "data": {"path": str(data)}})
    (run / "config.yaml").write_text(config_to_yaml(config))
    (run / "data_fingerprint.json").write_text(json.dumps(data_fingerprint(config.data)))
    text = data.read_text()
    data.write_text(text.replace("document 3 ", "document X "))  # same size, other content
    assert changed_data(
        json.loads((run / "data_fingerprint.json").read_text()), data_fingerprint(config.data)
    )
    code = cli.main(["train", f"output_dir={run}", f"data.path={data}"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lmscale: error:")]
    assert code == 2 and len(errors) == 1, errors
    assert f"data file {data} changed (same size, other content)" in errors[0] and "--force" in errors[0]
    data.write_text(text + json.dumps({"text": "one more"}) + "\n")
    assert "it had" in changed_data(
        json.loads((run / "data_fingerprint.json").read_text()), data_fingerprint(config.data)
    )


WATCHDOG_SCRIPT = """
import sys, time
from pathlib import Path
from lmscale.training.watchdog import HangWatchdog
watchdog = HangWatchdog(Path(sys.argv[1]), rank=1, timeout_s=1.0)
watchdog.start()
watchdog.beat(5, "training step")
time.sleep(60)  # a collective that never returns
"""


def test_watchdog_dumps_stacks_says_where_and_exits(tmp_path):
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", WATCHDOG_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 3 and time.monotonic() - started < 30
    line = [line for line in result.stderr.splitlines() if line.startswith("lmscale: error:")]
    assert len(line) == 1 and f"rank 1 on {socket.gethostname()} made no progress" in line[0]
    assert "after step 5 (training step" in line[0] and "hang_rank1.txt" in line[0]
    dump = (tmp_path / "hang_rank1.txt").read_text()
    assert "time.sleep(60)" in dump or "line 8" in dump
    assert "Thread" in dump  # every thread's stack, the watchdog's own too
