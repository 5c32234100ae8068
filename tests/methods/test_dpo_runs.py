"""A real DPO run of a saved tiny model on 2 ranks under ZeRO-3: it learns the preference, resumes exactly after
a rank is SIGKILLed, and exports with its reference (LoRA runs of every pair method: test_lora_method_runs.py).
The other method runs share this module's arguments and its die-and-resume check."""

import json
from pathlib import Path

import pytest
import torch
from finetune_data import preference_records, save_pretrained_model, write_jsonl
from helpers import run_lmscale

pytestmark = pytest.mark.slow

STEPS, SAVE_AT = 24, 12
DIE_AFTER = SAVE_AT + 4  # steps SAVE_AT + 1 .. + 3 are logged before the kill


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


def die_and_resume(args: list[str], die_after: int = DIE_AFTER):
    """Launch on 2 ranks with rank 1 SIGKILLed after step `die_after`, keep the steps logged after the
    checkpoint at SAVE_AT, run the same command again, and check that it recomputes each of them bit for bit
    (the uninterrupted trajectory: no third run needed); returns the resumed run's result."""
    out = Path(next(a for a in args if a.startswith("output_dir=")).split("=", 1)[1])
    died = run_lmscale(
        "launch", "--gpus-per-node", "2", *args, env={"LMSCALE_FAULT": f"kill@step={die_after},rank=1"}
    )
    assert died.returncode != 0
    lines = (out / "metrics.jsonl").read_text().split("\n")[:-1]  # complete lines only
    before = [json.loads(line) for line in lines]
    before = {r["step"]: r for r in before if r["step"] > SAVE_AT and "loss" in r}
    assert set(range(SAVE_AT + 1, die_after)) <= set(before), sorted(before)
    resumed = run_lmscale("launch", "--gpus-per-node", "2", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"continuing from {out / 'checkpoints'}" in resumed.stderr
    after = {r["step"]: r for r in records(out) if "loss" in r}
    assert max(after) == STEPS
    for step, record in before.items():
        for figure in ("loss", "grad_norm", "pref_accuracy", "rewards_margin", "kl"):
            assert after[step].get(figure) == record.get(figure), (step, figure)
    return resumed


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_dpo_under_zero3_learns_the_preference_resumes_exactly_and_exports(workspace, tmp_path):
    # rank 1 is SIGKILLed after step DIE_AFTER; the same command resumes from step SAVE_AT on the saved reference
    run = tmp_path / "run"
    resumed = die_and_resume([*dpo_args(workspace, run), "zero.stage=3"])
    assert "dpo: reference log-probabilities" not in resumed.stderr  # read back, not recomputed
    assert (run / "reference_logps.npz").is_file()
    evals = [r for r in records(run) if "eval_pref_accuracy" in r]
    # step 0: the policy is the reference, every pair a tie; the DPO loss is log 2
    assert evals[0]["eval_pref_accuracy"] == 0.5 and evals[0]["eval_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert evals[-1]["eval_pref_accuracy"] >= 0.9, evals[-1]
    assert evals[-1]["eval_rewards_margin"] > 0 and evals[-1]["eval_loss"] < 0.6
    steps = [r for r in records(run) if "loss" in r]
    assert all(
        {"rewards_chosen", "rewards_rejected", "rewards_margin", "pref_accuracy"} <= set(r) for r in steps
    )
    assert "held-out preference accuracy:" in resumed.stdout

    exported = tmp_path / "model"
    assert run_lmscale("export", str(run), "--out", str(exported)).returncode == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(exported))
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] >= 500
    # the export carries the run's reference: `lmscale eval` scores it as training did (bf16 there, fp32 here)
    scores = json.loads(run_lmscale("eval", str(exported), "--json").stdout.strip().splitlines()[-1])
    assert scores["eval_pairs"] == 60 and scores["eval_loss"] == pytest.approx(
        evals[-1]["eval_loss"], abs=0.01
    )
    assert scores["eval_pref_accuracy"] == pytest.approx(evals[-1]["eval_pref_accuracy"], abs=0.05)


def test_dpo_under_tensor_parallelism_computes_like_one_process(workspace, tmp_path):
    """AutoTP splits the policy over 2 ranks: the reference pass and every step give one process's numbers
    (fp32; the other pair methods and KTO go through the same two-row batches and reference pass)."""
    llama = save_pretrained_model(tmp_path / "llama", family="llama")  # AutoTP has no plan for GPT-2
    exact = (
        f"model.path={llama}",
        "precision=fp32",
        "zero.stage=1",
        "train.max_steps=6",
        "train.eval_every=6",
        "checkpoint.save_every=100",
    )
    single, pair = tmp_path / "single", tmp_path / "pair"
    one = run_lmscale("train", *dpo_args(workspace, single), *exact)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_lmscale(
        "launch", "--gpus-per-node", "2", *dpo_args(workspace, pair), *exact, "parallel.tensor=2"
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "1 data-parallel x 2 tensor-parallel rank(s)" in two.stderr
    expected, got = records(single), records(pair)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for mine, theirs in zip(got, expected, strict=True):
        for figure in ("loss", "rewards_margin", "eval_loss", "eval_rewards_margin"):
            if figure in theirs:
                assert mine[figure] == pytest.approx(theirs[figure], abs=1e-5), (mine["step"], figure)
