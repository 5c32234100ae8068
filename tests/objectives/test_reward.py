"""Reward models without processes: the Bradley-Terry loss (with reward centering, with margins) and the rewards equal TRL's
RewardTrainer on the same model and batch, a 1% change of the centering shows, and `lmscale score` rates
records in any batching as the model does one by one."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from helpers import tiny_gpt2_config
from test_dpo import fixed_batch
from transformers import GPT2ForSequenceClassification

from lmscale.config import RewardConfig
from lmscale.errors import LmscaleError
from lmscale.evaluation.held_out import ModelForward
from lmscale.evaluation.scoring import length_batches, record_ids, score_command
from lmscale.objectives.reward import reward_objective


def reward_model(pad_id: int) -> GPT2ForSequenceClassification:
    torch.manual_seed(0)
    config = tiny_gpt2_config(48)
    config.num_labels, config.pad_token_id = 1, pad_id
    return GPT2ForSequenceClassification(config).eval()


@pytest.mark.parametrize(("center", "margins"), [(None, None), (0.05, None), (None, [0.5, 0.0, 1.5, -0.25])])
def test_the_loss_and_rewards_equal_trl_reward_trainer(tokenizer, tmp_path, center, margins):
    from trl import RewardConfig as TrlRewardConfig
    from trl import RewardTrainer

    model, batch = reward_model(tokenizer.pad_token_id), fixed_batch(tokenizer)
    batch.tensors.pop("margin", None)  # the pairs' margins are 0 unless data.margin_field gives them
    if margins:
        batch.tensors["margin"] = torch.tensor(margins)
    settings = RewardConfig(center_coefficient=center)
    with torch.no_grad():
        ours = reward_objective(settings)(ModelForward(model), batch)
    records = Dataset.from_list([{"chosen": "w1 w2", "rejected": "w1 w3"}] * 2)
    args = TrlRewardConfig(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, center_rewards_coefficient=center
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=records, processing_class=tokenizer)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if margins:
        inputs["margin"] = batch["margin"]
    with torch.no_grad():
        theirs = trainer.compute_loss(model, inputs)
    assert float(ours.summed) / ours.targets == pytest.approx(float(theirs), abs=1e-5)
    metrics = {name: values[-1] for name, values in trainer._metrics["eval"].items() if values}
    assert float(ours.sums["pref_accuracy"]) / batch.pairs == pytest.approx(metrics["accuracy"])
    assert float(ours.sums["rewards_margin"]) / batch.pairs == pytest.approx(metrics["margin"], abs=1e-5)
    if center:
        changed = RewardConfig(center_coefficient=center * 1.01)
        with torch.no_grad():
            moved = reward_objective(changed)(ModelForward(model), batch)
        assert abs(float(moved.summed) / moved.targets - float(theirs)) > 1e-6


def test_length_batches_hold_the_budget_and_every_record_once():
    lengths = [5, 30, 7, 12, 30, 3, 9]
    batches = length_batches(lengths, max_tokens=40)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= 40 or len(b) == 1 for b in batches)
    assert length_batches([100], max_tokens=10) == [[0]]  # a record over the budget still gets a batch


def test_score_writes_each_records_reward_in_order_whatever_the_batching(tokenizer, tmp_path):
    model = reward_model(tokenizer.pad_token_id)
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    records = [{"prompt": "w1 " * n, "completion": f"w{n} w2"} for n in (1, 6, 2, 9, 3)]
    records.append({"messages": [{"role": "user", "content": "w4"}, {"role": "assistant", "content": "w5"}]})
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    one_by_one = []
    with torch.no_grad():
        for record in records:
            ids = torch.tensor([record_ids(record, tokenizer)])
            one_by_one.append(float(model(input_ids=ids).logits[0, 0]))
    for budget in (16, 10_000):
        written = score_command(tmp_path / "rm", data, tmp_path / f"out{budget}.jsonl", budget)
        scored = [json.loads(line) for line in written.read_text().splitlines()]
        assert [{k: v for k, v in s.items() if k != "reward"} for s in scored] == records
        assert [s["reward"] for s in scored] == pytest.approx(one_by_one, abs=1e-5)
    from lmscale.evaluation.inference import Sampling, generate_command

    with pytest.raises(
        LmscaleError, match="is a sequence classifier .* and writes no text: rate records with"
    ):
        generate_command(tmp_path / "rm", "w1", None, False, Sampling(max_new_tokens=2))
    # a record longer than the model's positions is scored on its start, as training cut it
    limit = model.config.n_positions
    data.write_text(json.dumps({"prompt": "w1 " * (limit + 20), "completion": "w2"}) + "\n")
    written = score_command(tmp_path / "rm", data, tmp_path / "long.jsonl", 10_000)
    with torch.no_grad():
        start = torch.tensor([record_ids(json.loads(data.read_text()), tokenizer)[:limit]])
        expected = float(model(input_ids=start).logits[0, 0])
    assert json.loads(written.read_text())["reward"] == pytest.approx(expected, abs=1e-5)
    data.write_text('{"text": "no prompt"}\n')
    with pytest.raises(LmscaleError, match="line 1 has neither `messages` nor `prompt` and `completion`"):
        score_command(tmp_path / "rm", data, None, 100)


def test_a_pairs_margin_is_read_from_its_field_and_checked(tokenizer):
    from lmscale.data.preferences import encode_preferences

    batch = {
        "prompt": ["w1", "w1", "w1"],
        "chosen": ["w2", "w2", "w2"],
        "rejected": ["w3", "w3", "w3"],
        "margin": [0.75, None, "big"],
    }
    rows = encode_preferences(batch, tokenizer, max_seq_len=64)
    assert rows["margin"][:2] == [0.75, 0.0]  # no margin: 0
    assert rows["problem"] == ["", "", "margin must be a number"]
