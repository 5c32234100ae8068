"""The preference methods with LoRA adapters, a real run each on 2 ranks under ZeRO-2 (ZeRO-1 shares its
optimizer and checkpoint code in DeepSpeed's stage_1_and_2.py; LoRA under ZeRO-3 is
tests/training/test_finetune_runs.py's): the methods with a reference start as the base with the adapters off
(every record a tie), each learns, `lmscale eval` of the run gives the run's last figures, and the merged
export loads in transformers as the model class the method trains; two of them resume bit for bit after a
rank is SIGKILLed. One run per adapter path: DPO's (pairs, the reference by switching the adapters off), KTO's
(unpaired records and their KL rows) and the reward model's (its head saved beside the adapters). ORPO and
SimPO take DPO's path without the reference (the same pair batches and adapter checkpoints); their losses are
checked in full fine-tunes (test_pair_method_runs.py) and against TRL (tests/objectives), so a LoRA run of
each would add a minute of CI and no path of its own."""

import json

import pytest
import torch
from finetune_data import preference_records, save_pretrained_model, unpaired_records, write_jsonl
from helpers import run_lmscale
from test_dpo_runs import die_and_resume, dpo_args, records

pytestmark = pytest.mark.slow

STEPS = 24
# method -> (data file, the held-out accuracy it logs, extra settings)
METHODS = {
    "dpo": ("pairs.jsonl", "eval_pref_accuracy", ()),
    "kto": ("unpaired.jsonl", "eval_label_accuracy", ("data.format=unpaired",)),
    "reward": ("pairs.jsonl", "eval_pref_accuracy", ()),
}
WITH_REFERENCE = ("dpo", "kto")
# Rank 1 SIGKILLed mid-run, resumed bit for bit from an adapters-only checkpoint: the reward model's (its head is
# saved beside the adapters) and KTO's (its own records and KL rows).
KILLED = ("reward", "kto")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    base = tmp_path_factory.mktemp("lora-methods")
    save_pretrained_model(base / "pretrained")
    write_jsonl(base / "pairs.jsonl", preference_records(600))
    write_jsonl(base / "unpaired.jsonl", unpaired_records(600))
    return base


def lora_args(base, out, method):
    data, _, extra = METHODS[method]
    replaced = ("finetune.method=", "data.path=", "optim.lr=", *(e.split("=")[0] + "=" for e in extra))
    kept = [a for a in dpo_args(base, out, steps=STEPS) if not a.startswith(replaced)]
    return [
        *kept,
        f"finetune.method={method}",
        f"data.path={base / data}",
        *extra,
        "zero.stage=2",
        # every projection of the tiny model (peft's GPT-2 default is c_attn alone: too little to learn with)
        "finetune.lora={r: 8, alpha: 16, dropout: 0.0, target_modules: [c_attn, c_proj, c_fc]}",
        "optim.lr=5e-3",  # adapters (and the reward model's fresh head) move slowly at the full runs' 1e-3
    ]


@pytest.mark.parametrize("method", list(METHODS))
def test_each_preference_method_trains_lora_adapters(workspace, tmp_path, method):
    run = tmp_path / method
    args = lora_args(workspace, run, method)
    if method in KILLED:
        result = die_and_resume(args)
    else:
        result = run_lmscale("launch", "--gpus-per-node", "2", *args)
        assert result.returncode == 0, result.stderr[-3000:]
    accuracy = METHODS[method][1]
    evals = [r for r in records(run) if accuracy in r]
    if method in WITH_REFERENCE:
        # the adapters start at zero: the policy is its reference, every record a tie (a resumed run does not
        # evaluate the untrained model again, so the closing line compares with it only in an unbroken run)
        assert evals[0][accuracy] == 0.5
        assert method in KILLED or "(untrained: 0.500)" in result.stdout
    # 24 steps of rank-8 adapters move less than a full fine-tune (the ZeRO-3 runs reach 0.9): a clear rise
    assert evals[-1][accuracy] >= max(0.65, evals[0][accuracy] + 0.15), evals
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    scores = json.loads(run_lmscale("eval", str(run), "--json").stdout.strip().splitlines()[-1])
    # the run computes with torch's fused tanh-GELU, the loaded model with HF's composed one, both in bf16: equal
    # to bf16's rounding (transformers 5.25's GPT-2 met 1.8e-4 on a loss of 0.65 where 5.24 stayed under 1e-4)
    assert scores["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], abs=5e-4)
    assert scores[accuracy] == pytest.approx(evals[-1][accuracy], abs=0.02)

    merged = tmp_path / "merged"
    assert run_lmscale("export", str(run), "--out", str(merged), "--merge").returncode == 0
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    loader = AutoModelForSequenceClassification if method == "reward" else AutoModelForCausalLM
    model = loader.from_pretrained(str(merged))
    assert not any("lora" in name for name, _ in model.named_parameters())
    output = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert torch.isfinite(output).all() and output.shape[-1] == (
        1 if method == "reward" else model.config.vocab_size
    )
