"""checkpoint.async in real 2-rank jobs: a full disk and a SIGKILL during a background write leave the
previous checkpoint the newest, and the same command resumes exactly from a checkpoint written while
training went on."""

import json

import pytest
from helpers import SHORT_RUN_ARGS, run_lmscale

pytestmark = pytest.mark.slow

ARGS = [
    "launch",
    "--gpus-per-node",
    "2",
    *SHORT_RUN_ARGS,
    "train.max_steps=10",
    "checkpoint.async=true",
    "zero.stage=2",
]


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return {r["step"]: r["loss"] for r in records(out) if "loss" in r}


def latest(out):
    return (out / "checkpoints" / "latest").read_text().strip()


def test_async_checkpoints_survive_a_full_disk_and_a_kill_mid_write_and_resume_exactly(tmp_path, cache_dir):
    out = tmp_path / "run"

    def launch(fault=None):
        env = {"LMSCALE_FAULT": fault} if fault else {}
        args = [*ARGS, f"output_dir={out}", f"data.cache_dir={cache_dir}"]
        return run_lmscale(*args, env=env, timeout=600)

    # Rank 1's writer meets a full disk in step 4's files while both ranks train on: the ranks agree on it
    # at the next step, remove the partial checkpoint, and end with one line naming the intact one.
    result = launch("enospc@save,step=4,rank=1")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "lmscale: error:" in line]
    assert errors and all("while saving step 4; the checkpoint of step 2 is intact" in e for e in errors)
    assert any("no space left on" in e for e in errors), errors
    assert latest(out) == "step_00000002" and not list((out / "checkpoints").glob("step_00000004*"))

    # Rank 1 is SIGKILLed while its writer is in step 6's files; the job dies with training ahead of it.
    result = launch("kill@save,step=6,rank=1")
    assert result.returncode != 0 and "step_00000002 (step 2)" in result.stderr
    assert "step 4 complete, written in the background" in result.stderr
    assert latest(out) == "step_00000004" and (out / "checkpoints" / "step_00000006.partial").is_dir()
    before_death = losses(out)

    # The same command resumes from step 4, the newest complete one, and recomputes what the dead job
    # logged after it bit for bit; the last checkpoint is complete when the run says so.
    result = launch()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping incomplete" in result.stderr and "step_00000004 (step 4)" in result.stderr
    after = losses(out)
    assert {s: after[s] for s in before_death if s > 4} == {s: v for s, v in before_death.items() if s > 4}
    assert max(before_death) >= 6
    assert latest(out) == "step_00000010" and (out / "checkpoints" / "step_00000010" / "COMPLETE").is_file()
    stalls = [r["checkpoint_stall_s"] for r in records(out) if "checkpoint_stall_s" in r]
    assert stalls and all(0 <= s < 30 for s in stalls)
