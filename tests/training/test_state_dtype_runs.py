"""optim.state_dtype=bf16 on 2 CPU ranks under ZeRO-2: the optimizer's states and master weights are bf16 in
the checkpoint (DeepSpeed's bf16_master_weights_and_grads / bf16_optimizer_states), the run learns, and a rank
killed mid-run resumes bit for bit."""

import json

import pytest
import torch
from helpers import SHORT_RUN_ARGS, run_lmscale

pytestmark = pytest.mark.slow

ARGS = [*SHORT_RUN_ARGS, "zero.stage=2", "optim.state_dtype=bf16"]


def losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_bf16_optimizer_states_are_bf16_learn_and_resume_exactly(tmp_path, cache_dir):
    def launch(out, fault=None):
        env = {"LMSCALE_FAULT": fault} if fault else None
        common = [f"output_dir={out}", f"data.cache_dir={cache_dir}", *ARGS]
        return run_lmscale("launch", "--gpus-per-node", "2", *common, env=env, timeout=600)

    reference = tmp_path / "reference"
    result = launch(reference)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = losses(reference)
    assert expected[8] < expected[1] - 0.5, expected
    (states,) = (reference / "checkpoints" / "step_00000008").glob("bf16_zero_pp_rank_0_*optim_states.pt")
    saved = torch.load(states, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    moments = [t for state in saved["base_optimizer_state"]["state"].values() for t in state.values()]
    assert moments and all(t.dtype == torch.bfloat16 for t in moments if t.dim() > 0)
    assert all(t.dtype == torch.bfloat16 for t in saved["single_partition_of_fp32_groups"])  # the master copy

    dead = tmp_path / "dead"
    assert launch(dead, fault="exit@step=5,rank=1").returncode != 0
    result = launch(dead)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "continuing from" in result.stderr and "step_00000004" in result.stderr
    assert losses(dead) == expected
