"""Real DPO runs of a saved tiny model on 2 ranks: full fine-tuning under ZeRO-3 that learns the
preference, resumes exactly after a rank dies and exports; LoRA under ZeRO 0 and 2 against the base."""

import json

import pytest
import torch
from finetune_data import preference_records, save_pretrained_model, write_jsonl
from helpers import run_lmscale

pytestmark = pytest.mark.slow

STEPS, SAVE_AT = 24, 12


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    base = tmp_path_factory.mktemp("dpo")
    save_pretrained_model(base / "pretrained")
    write_jsonl(base / "pairs.jsonl", preference_records(600))
    return base


def dpo_args(base, out, steps=STEPS):
    return [
        f"model.path={base / 'pretrained'}",
        f"data.path={base / 'pairs.jsonl'}",
        f"data.cache_dir={base / 'cache'}",
        f"output_dir={out}",
        "data.format=preference",
        "finetune.method=dpo",
        "data.eval_fraction=0.1",
        "data.max_seq_len=64",
        "data.max_tokens_per_batch=512",
        f"train.max_steps={steps}",
        "schedule.warmup_steps=2",
        "optim.lr=1e-3",
        "train.log_every=1",
        f"train.eval_every={steps}",
        f"checkpoint.save_every={SAVE_AT}",
        "train.eval_batches=1000",
        "wandb.mode=disabled",
    ]


def kill_and_resume(args: list[str]):
    """Launch on 2 ranks with rank 1 dying after step SAVE_AT + 1, then run the same command again; returns
    the resumed run's result."""
    died = run_lmscale(
        "launch", "--gpus-per-node", "2", *args, env={"LMSCALE_FAULT": f"exit@step={SAVE_AT + 1},rank=1"}
    )
    assert died.returncode != 0
    resumed = run_lmscale("launch", "--gpus-per-node", "2", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return resumed


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_dpo_under_zero3_learns_the_preference_resumes_exactly_and_exports(workspace, tmp_path):
    whole = tmp_path / "whole"
    args = [*dpo_args(workspace, whole), "zero.stage=3"]
    result = run_lmscale("launch", "--gpus-per-node", "2", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [r for r in records(whole) if "eval_pref_accuracy" in r]
    # step 0: the policy is the reference, every pair a tie; the DPO loss is log 2
    assert evals[0]["eval_pref_accuracy"] == 0.5 and evals[0]["eval_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert evals[-1]["eval_pref_accuracy"] >= 0.9, evals[-1]
    assert evals[-1]["eval_rewards_margin"] > 0 and evals[-1]["eval_loss"] < 0.6
    steps = [r for r in records(whole) if "loss" in r]
    assert all(
        {"rewards_chosen", "rewards_rejected", "rewards_margin", "pref_accuracy"} <= set(r) for r in steps
    )
    assert "held-out preference accuracy:" in result.stdout and "(untrained: 0.500)" in result.stdout
    assert (whole / "reference_logps.npz").is_file()

    # rank 1 dies after step SAVE_AT + 1; the same command resumes from step SAVE_AT on the saved reference
    broken = tmp_path / "broken"
    resumed = kill_and_resume([*dpo_args(workspace, broken), "zero.stage=3"])
    assert f"continuing from {broken / 'checkpoints'}" in resumed.stderr
    assert "dpo: reference log-probabilities" not in resumed.stderr  # read back, not recomputed
    expected = {r["step"]: r for r in records(whole) if "loss" in r}
    assert max(r["step"] for r in records(broken)) == STEPS
    for record in records(broken):
        if record["step"] > SAVE_AT and "loss" in record:
            assert record["loss"] == expected[record["step"]]["loss"], record["step"]
            assert record["pref_accuracy"] == expected[record["step"]]["pref_accuracy"]

    exported = tmp_path / "model"
    assert run_lmscale("export", str(whole), "--out", str(exported)).returncode == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(exported))
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] >= 500
    # the export carries the run's reference: `lmscale eval` scores it as training did (bf16 there, fp32 here)
    scores = json.loads(run_lmscale("eval", str(exported), "--json").stdout.strip().splitlines()[-1])
    assert scores["eval_pairs"] == 60 and scores["eval_loss"] == pytest.approx(
        evals[-1]["eval_loss"], abs=0.01
    )
    assert scores["eval_pref_accuracy"] == pytest.approx(evals[-1]["eval_pref_accuracy"], abs=0.05)


# ZeRO-1 shares ZeRO-2's optimizer and checkpoint code in DeepSpeed (stage_1_and_2.py): 2 stands for both; LoRA
# under ZeRO-3 is tests/training/test_finetune_runs.py's (CI time: ZeRO-0 has no run of its own).
@pytest.mark.parametrize("stage", [2])
def test_dpo_with_lora_scores_against_the_base(workspace, tmp_path, stage):
    run = tmp_path / "lora"
    args = [
        *dpo_args(workspace, run, steps=12),
        f"zero.stage={stage}",
        "finetune.lora.r=8",
        "finetune.lora.dropout=0",
    ]
    result = run_lmscale("launch", "--gpus-per-node", "2", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [r for r in records(run) if "eval_pref_accuracy" in r]
    assert evals[0]["eval_pref_accuracy"] == 0.5  # LoRA starts as the base: every pair a tie
    assert evals[-1]["eval_pref_accuracy"] > 0.7 and evals[-1]["eval_rewards_margin"] > 0
    scores = json.loads(run_lmscale("eval", str(run), "--json").stdout.strip().splitlines()[-1])
    # the run computes with torch's fused tanh-GELU, the loaded model with HF's composed one: equal to rounding
    assert scores["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], abs=1e-4)
    assert scores["eval_pref_accuracy"] == pytest.approx(evals[-1]["eval_pref_accuracy"], abs=0.02)
    merged = tmp_path / "merged"
    assert run_lmscale("export", str(run), "--out", str(merged), "--merge").returncode == 0
    assert (merged / "model.safetensors").is_file()
