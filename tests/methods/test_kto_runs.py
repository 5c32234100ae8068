"""A real KTO run of a saved tiny model on 2 ranks under ZeRO-3: the reference pass scores every record and
its KL sequence, the held-out rewards of desirable and undesirable completions move apart, a run whose rank
dies resumes with the same losses, and the export loads and evaluates like the run."""

import json

import pytest
import torch
from finetune_data import save_pretrained_model, unpaired_records, write_jsonl
from helpers import run_lmscale
from test_dpo_runs import SAVE_AT, STEPS, dpo_args, kill_and_resume, records

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    base = tmp_path_factory.mktemp("kto")
    save_pretrained_model(base / "pretrained")
    write_jsonl(base / "pairs.jsonl", unpaired_records(600))  # dpo_args reads pairs.jsonl
    return base


def kto_args(base, out):
    replaced = ("finetune.method=", "data.format=")
    return [a for a in dpo_args(base, out) if not a.startswith(replaced)] + [
        "finetune.method=kto",
        "data.format=unpaired",
        "zero.stage=3",
    ]


def test_kto_under_zero3_separates_the_labels_resumes_exactly_and_exports(workspace, tmp_path):
    whole = tmp_path / "whole"
    result = run_lmscale("launch", "--gpus-per-node", "2", *kto_args(workspace, whole))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kto: reference log-probabilities of" in result.stderr
    evals = [r for r in records(whole) if "eval_label_accuracy" in r]
    # step 0: the policy is the reference, every reward and the KL estimate 0: each record costs 1 - sigmoid(0)
    assert evals[0]["eval_loss"] == pytest.approx(0.5, abs=1e-4) and evals[0]["eval_label_accuracy"] == 0.5
    last = evals[-1]
    assert last["eval_rewards_chosen"] - last["eval_rewards_rejected"] == pytest.approx(
        last["eval_rewards_margin"]
    )
    assert last["eval_rewards_margin"] > 0.2 and last["eval_label_accuracy"] >= 0.7, last
    assert last["eval_loss"] < 0.48
    steps = [r for r in records(whole) if "loss" in r]
    assert all({"kl", "label_accuracy", "rewards_margin"} <= set(r) for r in steps)
    assert "held-out label accuracy:" in result.stdout and "(untrained: 0.500)" in result.stdout

    broken = tmp_path / "broken"
    kill_and_resume(kto_args(workspace, broken))
    expected = {r["step"]: r for r in steps}
    for record in records(broken):
        if record["step"] > SAVE_AT and "loss" in record:
            assert record["loss"] == expected[record["step"]]["loss"], record["step"]
    assert records(broken)[-1]["step"] == STEPS

    exported = tmp_path / "model"
    assert run_lmscale("export", str(whole), "--out", str(exported)).returncode == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(exported))
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] >= 500
    scores = json.loads(run_lmscale("eval", str(exported), "--json").stdout.strip().splitlines()[-1])
    assert scores["eval_records"] > 100  # every held-out record, against the reference the export carries
    assert scores["eval_label_accuracy"] == pytest.approx(last["eval_label_accuracy"], abs=0.05)
