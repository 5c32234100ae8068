"""Exact resume: a 2-rank job killed with SIGKILL after a checkpoint continues the same loss curve."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from helpers import REPO

pytestmark = pytest.mark.slow

STEPS, SAVE_AT = 16, 8
ARGS = [
    "data.max_seq_len=64",
    "data.vocab_size=1024",
    "data.max_tokens_per_batch=1024",
    f"train.max_steps={STEPS}",
    "schedule.warmup_steps=2",
    "train.eval_every=8",
    "train.eval_batches=2",
    "train.log_every=1",
    f"checkpoint.save_every={SAVE_AT}",
    "data.num_workers=1",
    "wandb.mode=disabled",
    "precision=bf16",
]


STREAMING = ["data.streaming=true", "data.shuffle_buffer=300", "data.tokenizer_docs=300"]


def live_group_members(pgid: int) -> list[int]:
    """Processes of group `pgid` that have not died (zombies excluded: they hold nothing)."""
    members = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()  # state, ppid, pgrp, ...
        except OSError:
            continue  # gone meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


def wait_for_group_exit(pgid: int, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while live_group_members(pgid) and time.time() < deadline:
        time.sleep(0.1)
    assert not live_group_members(pgid), (
        f"processes of the killed job still alive: {live_group_members(pgid)}"
    )


def launch(out, cache_dir, zero, extra=()):
    command = [
        sys.executable,
        "-m",
        "lmscale.cli",
        "launch",
        "--gpus-per-node",
        "2",
        f"output_dir={out}",
        f"data.cache_dir={cache_dir}",
        f"zero.stage={zero}",
        *ARGS,
        *extra,
    ]
    return subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(steps), "steps went backwards in metrics.jsonl"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


# ZeRO-1 shares ZeRO-2's optimizer class and checkpoint layout in DeepSpeed (stage_1_and_2.py), and
# lmscale's checkpoint code does not tell them apart: ZeRO-2 stands for both. A streamed corpus adds each
# worker's place in its shard to what must come back. ZeRO-3's exact resume after a dead rank is the DPO,
# ORPO and KTO runs' (tests/methods), ZeRO-0's the fault runs' (CI time: one SIGKILL run here).
# bf16 optimizer states too (optim.state_dtype): their moments and master partitions must come back exactly
# (CI time: one run checks both).
BF16_STATES = ["optim.state_dtype=bf16"]


def assert_states_are_bf16(checkpoint) -> None:
    """DeepSpeed's bf16_optimizer_states: the moments and the master partitions in the file are bf16."""
    import torch

    (states,) = checkpoint.glob("bf16_zero_pp_rank_0_*optim_states.pt")
    saved = torch.load(states, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    moments = [t for state in saved["base_optimizer_state"]["state"].values() for t in state.values()]
    assert moments and all(t.dtype == torch.bfloat16 for t in moments if t.dim() > 0)
    assert all(t.dtype == torch.bfloat16 for t in saved["single_partition_of_fp32_groups"])


@pytest.mark.parametrize(
    ("zero", "extra"), [(2, STREAMING + BF16_STATES)], ids=["zero2-streaming-bf16-states"]
)
def test_sigkill_then_resume_continues_the_same_curve(tmp_path, cache_dir, zero, extra):
    reference = launch(tmp_path / "reference", cache_dir, zero, extra)
    output = reference.communicate(timeout=900)[0]
    assert reference.returncode == 0, output[-3000:]
    if "optim.state_dtype=bf16" in extra:
        assert_states_are_bf16(tmp_path / "reference" / "checkpoints" / f"step_{SAVE_AT:08d}")

    out = tmp_path / "killed"
    job = launch(out, cache_dir, zero, extra)
    marker = out / "checkpoints" / f"step_{SAVE_AT:08d}" / "COMPLETE"
    deadline = time.time() + 900
    while not marker.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), job.communicate()[0][-3000:]
    # The whole job at once: lmscale's launcher, and DeepSpeed's launchers and ranks, which run in a process
    # group of their own (so that a terminal's Ctrl-C reaches only lmscale's, which hands it to the ranks).
    groups = [child.pid for child in psutil.Process(job.pid).children()] + [job.pid]
    for group in groups:
        os.killpg(group, signal.SIGKILL)
    job.wait()
    for group in groups:
        wait_for_group_exit(group)  # the ranks die after the launcher; the restart must not race them
    assert max(losses(out)) < STEPS, "the job finished before it could be killed"

    resumed = launch(out, cache_dir, zero, extra)
    output = resumed.communicate(timeout=900)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert f"resume: continuing from {out / 'checkpoints'}" in output
    expected, got = losses(tmp_path / "reference"), losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    # bitwise: same data order, same RNG, same reductions (gloo on CPU is deterministic)
    assert [got[s] for s in range(SAVE_AT + 1, STEPS + 1)] == [
        expected[s] for s in range(SAVE_AT + 1, STEPS + 1)
    ]
