"""Elastic resume: a checkpoint written by 2 ranks continues on 1, and one written by 1 continues on 2."""

import json

import pytest
import torch
from helpers import run_lmscale

pytestmark = pytest.mark.slow

ARGS = [
    "data.max_seq_len=64",
    "data.vocab_size=1024",
    "data.max_tokens_per_batch=1024",
    "schedule.warmup_steps=1",
    "checkpoint.save_every=3",
    "train.eval_every=3",
    "train.eval_batches=2",
    "train.log_every=1",
    "wandb.mode=disabled",
    "precision=bf16",
]


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train(ranks, out, cache_dir, zero, steps):
    command = ["launch", "--gpus-per-node", str(ranks)] if ranks > 1 else ["train"]
    result = run_lmscale(
        *command,
        f"output_dir={out}",
        f"data.cache_dir={cache_dir}",
        f"zero.stage={zero}",
        f"train.max_steps={steps}",
        *ARGS,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout + result.stderr


# ZeRO-3, whose partitioned parameters and optimizer states both go through the universal checkpoint; ZeRO-2's
# states take the same path (CI time: one run).
@pytest.mark.parametrize("zero", [3])
def test_two_ranks_to_one_and_back_continues_training(tmp_path, cache_dir, zero):
    out = tmp_path / "run"
    train(2, out, cache_dir, zero, steps=6)
    output = train(1, out, cache_dir, zero, steps=9)
    assert "checkpoint written by 2 data-parallel rank(s), continuing on 1 data-parallel rank(s)" in output
    assert ((out / "checkpoints" / "step_00000006" / "universal").is_dir()) == (zero > 0)
    # DeepSpeed 0.19.8's ZeRO-3 universal load shares one Adam step counter among the parameter groups and gives
    # all of them the first group's weight decay; mended after the load (lmscale.checkpointing.checkpoint): 3
    # steps on, each group has stepped 9 times and decays as it did (bf16: the fp32 states are in bf16_*).
    states = torch.load(
        out / "checkpoints" / "step_00000009" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        weights_only=False,
    )["optimizer_state_dict"]["optimizer_state_dict"]
    assert [group["weight_decay"] for group in states["param_groups"]] == [0.0, 0.1]
    assert [float(state["step"]) for state in states["state"].values()] == [9.0, 9.0]
    output = train(2, out, cache_dir, zero, steps=12)
    assert "checkpoint written by 1 data-parallel rank(s), continuing on 2 data-parallel rank(s)" in output

    steps = [r["step"] for r in records(out)]
    assert steps == sorted(steps)
    loss = {r["step"]: r["loss"] for r in records(out) if "loss" in r}
    assert sorted(loss) == list(range(1, 13))

    # The weights came back: after each resume the loss stays where training had brought it, well
    # below a fresh model's (steps 1-3; a fresh model would start there again).
    def mean(first, last):
        return sum(loss[s] for s in range(first, last + 1)) / (last - first + 1)

    assert mean(7, 9) < mean(1, 3) - 0.3, loss
    assert mean(10, 12) < mean(1, 3) - 0.3, loss
