"""DPO without processes: preference records -> pairs, batches of pairs, the losses against TRL's
`DPOTrainer` on the same model and batch, and the config rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import tiny_gpt2_config
from transformers import GPT2LMHeadModel

from lmscale.config import Config, DataConfig, DpoConfig, build_config
from lmscale.data.batches import IGNORE_INDEX, EpochBatches
from lmscale.data.bucketing import plan_epoch
from lmscale.data.preferences import encode_preferences, pair_sequences
from lmscale.data.tasks import check_problems, task_format
from lmscale.errors import ConfigError, LmscaleError
from lmscale.evaluation.held_out import ModelForward
from lmscale.objectives.dpo import (
    dpo_objective,
    pair_scores,
    preference_figures,
    sequence_logps,
    with_reference,
)


def encode(records: list[dict], tokenizer, max_seq_len: int = 64) -> dict:
    batch = {key: [r.get(key) for r in records] for key in records[0]}
    return encode_preferences(batch, tokenizer, max_seq_len)


def test_a_text_pair_becomes_two_sequences_sharing_the_masked_prompt(tokenizer):
    rows = encode([{"prompt": "w1 w2", "chosen": "w3", "rejected": "w4 w5 w6"}], tokenizer)
    eos = tokenizer.eos_token_id
    w = tokenizer.convert_tokens_to_ids
    assert rows["input_ids"] == [[w("w1"), w("w2"), w("w3"), eos]]
    assert rows["rejected_ids"] == [[w("w1"), w("w2"), w("w4"), w("w5"), w("w6"), eos]]
    assert rows["prompt_len"] == [2] and rows["targets"] == [1] and rows["problem"] == [""]
    # planned as two rows as wide as the longer reply; holds the tokens of both
    assert rows["length"] == [12] and rows["tokens"] == [10]


def test_message_list_pairs_with_and_without_a_prompt_render_the_same_prompt(tokenizer):
    user = [{"role": "user", "content": "w1 w2"}]
    chosen, rejected = [{"role": "assistant", "content": "w3"}], [{"role": "assistant", "content": "w4"}]
    explicit = encode([{"prompt": user, "chosen": chosen, "rejected": rejected}], tokenizer)
    implicit = encode([{"chosen": user + chosen, "rejected": user + rejected}], tokenizer)
    assert explicit["input_ids"] == implicit["input_ids"] and explicit["prompt_len"] == implicit["prompt_len"]
    prompt_len = explicit["prompt_len"][0]
    prompt = tokenizer.convert_ids_to_tokens(explicit["input_ids"][0][:prompt_len])
    assert prompt == ["user", ":", "w1", "w2", "assistant", ":"]


@pytest.mark.parametrize(
    "record, problem",
    [
        ({"prompt": "w1", "chosen": "w2", "rejected": ""}, "the replies non-empty"),
        ({"prompt": "w1", "chosen": 3, "rejected": "w2"}, "must be strings"),
        (
            {
                "chosen": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}],
                "rejected": [{"role": "user", "content": "w9"}, {"role": "assistant", "content": "w3"}],
            },
            "share every message but the last",
        ),
        ({"chosen": [{"role": "user", "content": "w1"}], "rejected": []}, "assistant"),
        ({"prompt": "w1", "chosen": "w2", "rejected": None}, "it has no 'rej' field (data.rejected_field)"),
    ],
)
def test_unusable_records_name_their_problem(tokenizer, record, problem):
    rows = encode([record], tokenizer)
    fmt = task_format(DataConfig(format="preference", rejected_field="rej"), "causal_lm")
    with pytest.raises(ConfigError) as error:
        check_problems(Dataset.from_dict(rows), ["pairs.jsonl line 8"], fmt, "train", "error")
    message = str(error.value)
    assert "1 unusable record(s): pairs.jsonl line 8: " in message and problem in message
    assert "data.prompt_field='prompt', data.chosen_field='chosen', data.rejected_field='rej'" in message


def test_a_pair_whose_prompt_fills_the_context_is_dropped():
    assert pair_sequences(list(range(8)), [9], [10, 11], eos=0, max_seq_len=8) is None
    kept = pair_sequences(list(range(6)), [9], [10, 11, 12, 13], eos=0, max_seq_len=8)
    assert kept["input_ids"] == [0, 1, 2, 3, 4, 5, 9, 0] and len(kept["rejected_ids"]) == 8


def pair_dataset(tokenizer, count: int = 6) -> Dataset:
    records = [
        {
            "prompt": f"w{i} w{i + 1}",
            "chosen": f"w{i + 2}",
            "rejected": " ".join(f"w{j}" for j in range(i % 3 + 1)),
        }
        for i in range(count)
    ]
    rows = encode(records, tokenizer)
    del rows["problem"]
    return Dataset.from_dict(rows)


def test_both_replies_of_a_pair_share_a_batch_chosen_rows_first(tokenizer):
    pairs = pair_dataset(tokenizer)
    lengths = np.asarray(pairs["length"])
    plan = plan_epoch(lengths, 1, seed=0, epoch=0, max_tokens=48, targets=np.asarray(pairs["targets"]))
    batches = EpochBatches(pairs, lengths, plan, 0, tokenizer.pad_token_id, None)
    seen = 0
    for group in range(len(plan)):
        batch = batches[group]
        rows = [int(r) for r in plan.groups[group][0]]
        n = batch.pairs
        assert n == len(rows) and batch["input_ids"].size(0) == 2 * n
        assert batch["input_ids"].numel() <= 48  # the budget counts both rows of a pair
        for i, row in enumerate(rows):
            chosen, rejected = pairs[row]["input_ids"], pairs[row]["rejected_ids"]
            assert batch["input_ids"][i, : len(chosen)].tolist() == chosen
            assert batch["input_ids"][n + i, : len(rejected)].tolist() == rejected
            assert (batch["labels"][i, : pairs[row]["prompt_len"]] == IGNORE_INDEX).all()
        assert batch.group_targets == n  # DPO's loss is a mean over pairs
        assert batch.real_tokens == int(batch["attention_mask"].sum())
        seen += n
    assert seen == len(pairs)


def tiny_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(tiny_gpt2_config(48)).eval()


def fixed_batch(tokenizer) -> dict:
    pairs = pair_dataset(tokenizer, 4)
    lengths = np.asarray(pairs["length"])
    plan = plan_epoch(lengths, 1, seed=0, epoch=0, max_tokens=10_000, targets=np.asarray(pairs["targets"]))
    reference = np.array([[-30.0 - i, -31.5 + i] for i in range(len(pairs))])
    pairs = with_reference(pairs, reference, "training")
    return EpochBatches(pairs, lengths, plan, 0, tokenizer.pad_token_id, None)[0]


@pytest.mark.parametrize("loss", ["sigmoid", "hinge", "ipo"])
def test_the_loss_equals_trl_dpo_trainer_on_the_same_model_and_batch(tokenizer, tmp_path, loss):
    import trl  # a test extra: TRL is the oracle here, never a dependency of lmscale

    model = tiny_model()
    batch = fixed_batch(tokenizer)
    settings = DpoConfig(beta=0.3, loss=loss)
    with torch.no_grad():
        ours = dpo_objective(settings)(ModelForward(model), batch)
    ours_mean = float(ours.summed) / ours.targets

    records = Dataset.from_list([{"prompt": "w1", "chosen": "w2", "rejected": "w3"}] * 2)
    args = trl.DPOConfig(
        output_dir=str(tmp_path),
        report_to=[],
        loss_type=[loss],
        beta=settings.beta,
        precompute_ref_log_probs=True,  # its reference then comes from the batch, as ours does
        use_cpu=True,
        bf16=False,
    )
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=records, processing_class=tokenizer)
    pairs = batch.pairs
    # TRL's completion mask marks the reply tokens: exactly where our labels are targets
    completion_mask = (batch["labels"] != IGNORE_INDEX).long()
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": completion_mask,
        "ref_chosen_logps": batch["ref_chosen_logp"],
        "ref_rejected_logps": batch["ref_rejected_logp"],
    }
    assert pairs == 4
    with torch.no_grad():
        theirs = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    assert ours_mean == pytest.approx(float(theirs), abs=1e-5)


def test_rewards_and_accuracy_count_a_tie_as_half():
    settings = DpoConfig(beta=0.5)
    policy = torch.tensor([-1.0, -2.0, -5.0, -2.0])  # chosen of 2 pairs, then rejected
    reference = torch.tensor([-2.0, -2.0, -4.0, -2.0])
    scores = pair_scores(policy, reference, torch.tensor([3, 3, 3, 3]), settings)
    assert scores.chosen_rewards.tolist() == [0.5, 0.0] and scores.rejected_rewards.tolist() == [-0.5, 0.0]
    figures = preference_figures(scores)
    assert float(figures["pref_accuracy"]) == 1.5 and float(figures["rewards_margin"]) == 1.0
    assert scores.losses[1].item() == pytest.approx(np.log(2))  # policy = reference: the loss is log 2


def test_sequence_logps_sum_only_the_targets():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX], [IGNORE_INDEX, 1, 2, 3, 4]])
    logps, counts = sequence_logps(logits, labels)
    by_hand = torch.log_softmax(logits, -1)
    assert counts.tolist() == [2, 4]
    assert logps[0].item() == pytest.approx((by_hand[0, 1, 3] + by_hand[0, 2, 4]).item(), abs=1e-6)


def test_reference_tables_that_do_not_fit_the_data_are_refused(tokenizer):
    pairs = pair_dataset(tokenizer, 3)
    with pytest.raises(LmscaleError, match="data .it changed since the run started"):
        with_reference(pairs, np.zeros((2, 2)), "training")


def dpo_config(**changes) -> dict:
    raw = {"finetune": {"method": "dpo"}, "data": {"format": "preference", "path": "pairs.jsonl"}}
    for key, value in changes.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return raw


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"finetune": {"method": "dpo"}}, "set data.format=preference"),
        ({"data": {"format": "preference"}}, "set finetune.method=dpo"),
        (dpo_config(data__batching="pad"), "data.batching=pad does not apply to finetune.method=dpo"),
        (dpo_config(data__batching="pack"), "data.batching=pack does not apply"),
        (dpo_config(data__max_seq_len=256, data__max_tokens_per_batch=400), "at least 512"),
        (dpo_config(train__label_smoothing=0.1), "train.label_smoothing applies to cross-entropy"),
        (dpo_config(finetune__task="classification"), "finetune.method=dpo needs finetune.task=causal_lm"),
        (dpo_config(finetune__dpo={"loss": "kto"}), "finetune.dpo.loss"),
    ],
)
def test_impossible_dpo_settings_name_the_key_and_fix(raw, message):
    with pytest.raises(ConfigError, match=message):
        build_config(raw)


def test_dpo_defaults():
    config = build_config(dpo_config())
    assert isinstance(config, Config)
    assert (config.finetune.dpo.beta, config.finetune.dpo.loss) == (0.1, "sigmoid")
    assert Config().finetune.method == "sft"
