"""A real KTO run of a saved tiny model on 2 ranks under ZeRO-3: the reference pass scores every record and
its KL sequence, the held-out rewards of desirable and undesirable completions move apart, a run whose rank
dies resumes with the same losses, and the export loads and evaluates like the run."""

import json

import pytest
import torch
from finetune_data import save_pretrained_model, unpaired_records, write_jsonl
from helpers import run_lmscale
from test_dpo_runs import die_and_resume, dpo_args, records

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
    run = tmp_path / "kto"
    resumed = die_and_resume(kto_args(workspace, run))
    assert "kto: reference log-probabilities of" not in resumed.stderr  # saved by the first start
    assert (run / "reference_logps.npz").is_file()
    evals = [r for r in records(run) if "eval_label_accuracy" in r]
    # step 0: the policy is the reference, every reward and the KL estimate 0: each record costs 1 - sigmoid(0)
    assert evals[0]["eval_loss"] == pytest.approx(0.5, abs=1e-4) and evals[0]["eval_label_accuracy"] == 0.5
    last = evals[-1]
    assert last["eval_rewards_chosen"] - last["eval_rewards_rejected"] == pytest.approx(
        last["eval_rewards_margin"]
    )
    assert last["eval_rewards_margin"] > 0.2 and last["eval_label_accuracy"] >= 0.7, last
    assert last["eval_loss"] < 0.48
    steps = [r for r in records(run) if "loss" in r]
    assert all({"kl", "label_accuracy", "rewards_margin"} <= set(r) for r in steps)
    assert "held-out label accuracy:" in resumed.stdout

    exported = tmp_path / "model"
    assert run_lmscale("export", str(run), "--out", str(exported)).returncode == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(exported))
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] >= 500
    scores = json.loads(run_lmscale("eval", str(exported), "--json").stdout.strip().splitlines()[-1])
    assert scores["eval_records"] > 100  # every held-out record, against the reference the export carries
    assert scores["eval_label_accuracy"] == pytest.approx(last["eval_label_accuracy"], abs=0.05)
