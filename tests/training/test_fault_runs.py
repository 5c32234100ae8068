"""Faults made to really happen in real jobs (LMSCALE_FAULT, lmscale.faults): a dead rank, a hung rank,
a full disk and a SIGKILL while a checkpoint is written, a corrupt newest checkpoint. Each ends with one
line and a non-zero exit, leaves the last complete checkpoint intact, and the same command resumes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from helpers import REPO, SHORT_RUN_ARGS, run_lmscale

pytestmark = pytest.mark.slow

ARGS = SHORT_RUN_ARGS


def losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def latest(out):
    return (out / "checkpoints" / "latest").read_text().strip()


def error_lines(result):
    return [line for line in result.stderr.splitlines() if "lmscale: error:" in line]


def test_a_dead_or_hung_rank_ends_the_job_and_the_restart_resumes_exactly(tmp_path, cache_dir):
    def launch(out, *extra, fault=None):
        env = {"LMSCALE_FAULT": fault} if fault else {}
        command = [
            "launch",
            "--gpus-per-node",
            "2",
            f"output_dir={out}",
            f"data.cache_dir={cache_dir}",
            *ARGS,
        ]
        started = time.monotonic()
        return run_lmscale(*command, *extra, env=env, timeout=600), time.monotonic() - started

    reference, reference_s = launch(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = losses(tmp_path / "reference")

    # A rank exits abruptly after step 5: the launcher ends the other rank and exits non-zero.
    dead = tmp_path / "dead"
    result, _ = launch(dead, fault="exit@step=5,rank=1")
    assert result.returncode != 0 and (dead / "checkpoints" / "latest").is_file(), result.stderr[-3000:]
    assert latest(dead) == "step_00000004" and max(losses(dead)) <= 6
    resumed, _ = launch(dead)  # the job's lock died with it: no holder blocks the restart
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continuing from" in resumed.stderr and "step_00000004" in resumed.stderr
    assert {s: losses(dead)[s] for s in range(5, 9)} == {s: expected[s] for s in range(5, 9)}

    # Under torchrun's elastic agent the same death is healed in place: the agent restarts both ranks, which
    # go on from step 4 and recompute steps 5-8 exactly, with no person running anything.
    healed = tmp_path / "healed"
    torchrun = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:29517", "--max-restarts", "1",
        str(REPO / "launcher" / "train.py"), f"output_dir={healed}", f"data.cache_dir={cache_dir}", *ARGS,
    ]  # fmt: skip
    result = subprocess.run(
        torchrun, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "LMSCALE_FAULT": "exit@step=5,rank=1,restart=0"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "elastic restart 1:" in result.stderr and "step_00000004 with 2 rank(s)" in result.stderr
    assert "torchrun restarts the job from the last checkpoint (restart 1 of 1)" in result.stderr
    assert {s: losses(healed)[s] for s in range(5, 9)} == {s: expected[s] for s in range(5, 9)}

    # A rank hangs after step 5: the watchdogs end the job within the timeout, with stacks and one line.
    hung = tmp_path / "hung"
    result, hung_s = launch(hung, "train.hang_timeout_s=10", fault="hang@step=5,rank=1")
    assert result.returncode != 0
    assert hung_s < reference_s + 10 + 45, (hung_s, reference_s)
    reports = [line for line in error_lines(result) if "made no progress for" in line]
    assert reports and "after step 5" in reports[0] and "hang_rank" in reports[0], result.stderr[-3000:]
    dumps = list(hung.glob("hang_rank*.txt"))
    assert dumps and any("most recent call first" in d.read_text() for d in dumps)
    # and the flight recorder's last collectives of each reporting rank (a rank blocked in one names it)
    assert all("last collectives in" in line for line in reports), reports
    recorded = [json.loads(p.read_text()) for p in hung.glob("flight_recorder_rank*.json")]
    assert recorded and all(
        any(e["profiling_name"].startswith("gloo:") for e in r["entries"]) for r in recorded
    )
    assert latest(hung) == "step_00000004"
    resumed, _ = launch(hung, "train.hang_timeout_s=10")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {s: losses(hung)[s] for s in range(5, 9)} == {s: expected[s] for s in range(5, 9)}


def test_full_disk_kill_mid_save_and_a_corrupt_checkpoint_lose_nothing(tmp_path, cache_dir):
    out = tmp_path / "run"

    def train(*extra, fault=None):
        env = {"LMSCALE_FAULT": fault} if fault else {}
        return run_lmscale(
            "train", f"output_dir={out}", f"data.cache_dir={cache_dir}", *ARGS, *extra, env=env, timeout=600
        )

    # The disk fills while step 4 is saved: one line, the partial checkpoint removed, step 2 still latest.
    result = train(fault="enospc@save,step=4")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = error_lines(result)
    assert "no space left on" in line and "while saving step 4; the checkpoint of step 2 is intact" in line
    assert latest(out) == "step_00000002" and not list((out / "checkpoints").glob("*.partial"))
    result = train()  # space freed: the same command resumes from step 2
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step_00000002 (step 2)" in result.stderr and latest(out) == "step_00000008"

    # SIGKILL inside the write of step 10: the next start uses step 8 and never reads the half-written one.
    result = train("train.max_steps=10", fault="kill@save,step=10")
    assert result.returncode == -9 and (out / "checkpoints" / "step_00000010.partial").is_dir()
    assert latest(out) == "step_00000008"
    result = train("train.max_steps=10")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping incomplete" in result.stderr and "step_00000008 (step 8)" in result.stderr
    assert not list((out / "checkpoints").glob("*.partial"))
    # each checkpoint keeps the config it was written with: the longer run did not rewrite step 8's
    saved = {
        tag: yaml.safe_load((out / "checkpoints" / tag / "config.yaml").read_text())
        for tag in ("step_00000008", "step_00000010")
    }
    assert (
        saved["step_00000008"]["train"]["max_steps"] == 8
        and saved["step_00000010"]["train"]["max_steps"] == 10
    )

    # A shard of the newest checkpoint is corrupted (same size): resume falls back to the one before, with
    # a warning naming both; asked for by name, it is one line.
    newest = out / "checkpoints" / "step_00000010"
    shard = newest / "mp_rank_00_model_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    explicit = train("train.max_steps=12", f"checkpoint.resume={newest}")
    assert explicit.returncode == 1 and "does not match the checksum" in error_lines(explicit)[0]
    result = train("train.max_steps=12")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step_00000010 is damaged" in result.stderr and "trying step_00000008" in result.stderr
    assert "step_00000008 (step 8)" in result.stderr and latest(out) == "step_00000012"


def test_ctrl_c_under_launch_saves_a_checkpoint_and_the_same_command_resumes(tmp_path, cache_dir):
    """A terminal's Ctrl-C reaches the launcher's whole process group: the ranks finish the step, save
    together and exit 0 (DeepSpeed's launcher alone would terminate them and lose the step)."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "lmscale.cli", "launch", "--gpus-per-node", "2", f"output_dir={out}"]
    command += [f"data.cache_dir={cache_dir}", *ARGS, "train.max_steps=30", "checkpoint.save_every=1000"]
    log = tmp_path / "launch.log"
    with log.open("w") as handle:
        launcher = subprocess.Popen(
            command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 300
            while not (out / "metrics.jsonl").is_file() or len(losses(out)) < 3:
                assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            os.killpg(launcher.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
            assert launcher.wait(timeout=120) == 0, log.read_text()[-3000:]
        finally:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
    text = log.read_text()
    assert "Traceback" not in text and "stopped by SIGINT" in text, text[-3000:]
    stopped_at = latest(out)
    assert (out / "checkpoints" / stopped_at).is_dir() and int(stopped_at.split("_")[1]) < 30
    resumed = run_lmscale(*command[3:], timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continuing from" in resumed.stderr and stopped_at in resumed.stderr
    assert latest(out) == "step_00000030"


@pytest.fixture
def small_disk(tmp_path):
    """A real 100 MiB filesystem (tmpfs) that a run can fill; skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_really_full_disk_keeps_the_run_resumable(small_disk, cache_dir):
    """The disk fills while a checkpoint is written, and is still full at the next start: each is one line,
    the run directory stays an lmscale run with its newest complete checkpoint, and it resumes once there
    is space."""
    out = small_disk / "run"

    def train():
        return run_lmscale(
            "train", f"output_dir={out}", f"data.cache_dir={cache_dir}", *ARGS, "train.max_steps=12"
        )

    result = train()  # each checkpoint of the tiny model takes ~45 MB: the third does not fit
    (line,) = error_lines(result)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "no space left on" in line and "the checkpoint of step 4 is intact" in line
    assert latest(out) == "step_00000004" and not list((out / "checkpoints").glob("*.partial"))
    filler = small_disk / "filler"
    with filler.open("wb") as handle:  # fill what is left
        while True:
            try:
                handle.write(b"\0" * (1 << 20))
                handle.flush()
            except OSError:
                break
    result = train()
    (line,) = error_lines(result)
    assert result.returncode == 1 and "No space left on device" in line and "Traceback" not in result.stderr
    assert "model:" in (out / "config.yaml").read_text() and not (out / "lmscale.lock").exists()
    filler.unlink()
    shutil.rmtree(out / "checkpoints" / "step_00000002")  # the user frees space
    result = train()
    assert "step_00000004 (step 4)" in result.stderr, result.stderr[-3000:]
