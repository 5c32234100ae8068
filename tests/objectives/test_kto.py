"""KTO without processes: unpaired records -> rows with a mismatched KL sequence, the loss and its logged
rewards against TRL's KTOTrainer on the same model and batch, and the config rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from test_dpo import tiny_model

from lmscale.config import DataConfig, KtoConfig, build_config
from lmscale.data.batches import IGNORE_INDEX, EpochBatches
from lmscale.data.bucketing import plan_epoch
from lmscale.data.tasks import check_problems, task_format
from lmscale.data.unpaired import encode_unpaired, kl_partners, with_kl_sequences
from lmscale.errors import ConfigError
from lmscale.evaluation.held_out import ModelForward
from lmscale.methods import method_for, method_problems
from lmscale.objectives.dpo import sequence_logps, with_reference
from lmscale.objectives.kto import kto_objective, kto_scores
from lmscale.objectives.loss import figure_means

RECORDS = [
    {"prompt": "w1 w2", "completion": "w3 w4", "label": True},
    {"prompt": "w5", "completion": "w6", "label": False},
    {"prompt": "w7 w8 w9", "completion": "w10 w11 w12", "label": True},
    {"prompt": "w13", "completion": "w14 w15", "label": False},
    {"prompt": "w16 w17", "completion": "w18", "label": True},
]


def encode(records: list[dict], tokenizer, max_seq_len: int = 64) -> dict:
    batch = {key: [r.get(key) for r in records] for key in records[0]}
    return encode_unpaired(batch, tokenizer, max_seq_len)


def unpaired_rows(tokenizer, records=RECORDS, max_seq_len: int = 64) -> Dataset:
    rows = Dataset.from_dict(encode(records, tokenizer, max_seq_len))
    fmt = task_format(DataConfig(format="unpaired"), "causal_lm")
    rows = check_problems(rows, [f"f line {i + 1}" for i in range(len(records))], fmt, "train", "error")
    return with_kl_sequences(rows, max_seq_len)


def test_a_record_is_its_completion_and_the_same_prompt_with_another_records_completion(tokenizer):
    rows = unpaired_rows(tokenizer)
    w, eos = tokenizer.convert_tokens_to_ids, tokenizer.eos_token_id
    assert rows[0]["input_ids"] == [w("w1"), w("w2"), w("w3"), w("w4"), eos]
    assert rows["prompt_len"] == [2, 1, 3, 1, 2] and rows["desirable"] == [1, 0, 1, 0, 1]
    for row in rows:
        prompt = row["input_ids"][: row["prompt_len"]]
        assert row["kl_ids"][: row["prompt_len"]] == prompt  # the same prompt...
        borrowed = row["kl_ids"][row["prompt_len"] :]
        assert borrowed != row["input_ids"][row["prompt_len"] :]  # ...with another record's completion
        assert row["length"] == 2 * max(len(row["input_ids"]), len(row["kl_ids"]))
        assert row["tokens"] == len(row["input_ids"]) + len(row["kl_ids"]) and row["targets"] == 1
    # every completion is borrowed once: the KL sequences hold the same completions as the records
    completions = sorted(tuple(r["input_ids"][r["prompt_len"] :]) for r in rows)
    assert sorted(tuple(r["kl_ids"][r["prompt_len"] :]) for r in rows) == completions


def test_partners_are_neighbours_in_length_with_another_prompt():
    lengths = np.array([5, 1, 3, 3, 9])
    prompts = [(1,), (2,), (3,), (3,), (4,)]
    partners = kl_partners(prompts, lengths)
    # length order 1, 2, 3, 0, 4: each takes the next; record 2 skips record 3, which has its prompt
    assert partners.tolist() == [4, 2, 0, 0, 1]
    assert sorted(kl_partners([(1,)] * 3, np.array([1, 2, 3])).tolist()) == [
        0,
        1,
        2,
    ]  # one prompt: a rotation


def test_message_records_and_unusable_ones(tokenizer):
    user = [{"role": "user", "content": "w1 w2"}]
    reply = [{"role": "assistant", "content": "w3"}]
    explicit = encode([{"prompt": user, "completion": reply, "label": True}], tokenizer)
    whole = encode([{"prompt": None, "completion": user + reply, "label": False}], tokenizer)
    assert explicit["input_ids"] == whole["input_ids"] and explicit["prompt_len"] == whole["prompt_len"]
    assert whole["desirable"] == [0]
    bad = encode(
        [
            {"prompt": "w1", "completion": "w2", "label": "yes"},
            {"prompt": "w1", "completion": "", "label": True},
            {"prompt": "w1", "completion": "w2", "label": None},
        ],
        tokenizer,
    )
    assert bad["problem"][0] == "label must be true or false"
    assert "the completion non-empty" in bad["problem"][1]
    fmt = task_format(DataConfig(format="unpaired", label_field="good"), "causal_lm")
    rows = Dataset.from_dict(bad)
    with pytest.raises(ConfigError, match="f line 1: label must be true or false and 2 more"):
        check_problems(rows, ["f line 1", "f line 2", "f line 3"], fmt, "train", "error")
    with pytest.raises(ConfigError, match=r"f line 3: it has no 'good' field \(data.label_field\)"):
        check_problems(rows.select([2]), ["f line 3"], fmt, "train", "error")


def reference_table(model, rows: Dataset) -> np.ndarray:
    """Each record's completion and KL sequence scored one at a time by `model` (the reference)."""
    table = []
    for row in rows:
        values = []
        for ids in (row["input_ids"], row["kl_ids"]):
            inputs = torch.tensor([ids])
            labels = inputs.clone()
            labels[0, : row["prompt_len"]] = IGNORE_INDEX
            with torch.no_grad():
                values.append(float(sequence_logps(model(input_ids=inputs).logits, labels)[0][0]))
        table.append(values)
    return np.array(table)


def kto_batch(tokenizer):
    rows = unpaired_rows(tokenizer)
    torch.manual_seed(1)  # a reference unlike the policy, so that rewards and the KL estimate are not 0
    reference = tiny_model()
    torch.nn.init.normal_(reference.transformer.wte.weight, std=0.5)
    rows = with_reference(rows, reference_table(reference, rows), "training")
    lengths = np.asarray(rows["length"])
    plan = plan_epoch(lengths, 1, seed=0, epoch=0, max_tokens=10_000, targets=np.asarray(rows["targets"]))
    return EpochBatches(rows, lengths, plan, 0, tokenizer.pad_token_id, None)[0]


def trl_inputs(batch) -> dict:
    """Our batch as TRL's collator builds it from tokenized records (with precomputed references)."""
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    records = batch.pairs
    examples = []
    for row in range(records):
        prompt_len = int((batch["labels"][row] == IGNORE_INDEX).long().argmin())
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        kl = batch["input_ids"][records + row][batch["attention_mask"][records + row].bool()].tolist()
        examples.append(
            {
                "prompt_ids": ids[:prompt_len],
                "completion_ids": ids[prompt_len:],
                "KL_completion_ids": kl[prompt_len:],
                "label": bool(batch["desirable"][row]),
                "ref_logps": float(batch["ref_logp"][row]),
                "ref_KL_logps": float(batch["ref_kl_logp"][row]),
            }
        )
    return DataCollatorForUnpairedPreference(pad_token_id=0, max_length=None)(examples)


def test_the_loss_and_rewards_equal_trl_kto_trainer_on_the_same_model_and_batch(tokenizer, tmp_path):
    import trl  # a test extra: TRL is the oracle here, never a dependency of lmscale

    settings = KtoConfig(beta=0.3, desirable_weight=1.3, undesirable_weight=0.8)
    batch = kto_batch(tokenizer)
    model = tiny_model()
    with torch.no_grad():
        ours = kto_objective(settings)(ModelForward(model), batch)
    records = Dataset.from_list([{"prompt": "w1", "completion": "w2", "label": i % 2 == 0} for i in range(4)])
    args = trl.KTOConfig(
        output_dir=str(tmp_path),
        report_to=[],
        beta=settings.beta,
        desirable_weight=settings.desirable_weight,
        undesirable_weight=settings.undesirable_weight,
        precompute_ref_log_probs=True,  # its reference then comes from the batch, as ours does
        per_device_train_batch_size=2,
        use_cpu=True,
        bf16=False,
    )
    trainer = trl.KTOTrainer(model=model, args=args, train_dataset=records, processing_class=tokenizer)
    trainer.model.eval()
    with torch.no_grad():
        theirs = trainer._compute_loss(trainer.model, trl_inputs(batch), return_outputs=False)
    metrics = {name: values[-1] for name, values in trainer._metrics["eval"].items()}
    assert batch.pairs == 5 and ours.targets == 5
    means = figure_means({k: float(v) for k, v in ours.sums.items()}, ours.targets)
    assert float(ours.summed) / ours.targets == pytest.approx(float(theirs), abs=1e-5)
    assert means["kl"] == pytest.approx(metrics["kl"], abs=1e-5) and means["kl"] > 0
    assert means["rewards_chosen"] == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
    assert means["rewards_rejected"] == pytest.approx(metrics["rewards/rejected"], abs=1e-5)
    assert means["rewards_margin"] == pytest.approx(metrics["rewards/margins"], abs=1e-5)
    # The test would notice a 1% change of any parameter.
    for field in type(settings).model_fields:
        changed = settings.model_copy(update={field: getattr(settings, field) * 1.01})
        with torch.no_grad():
            moved = kto_objective(changed)(ModelForward(model), batch)
        assert abs(float(moved.summed) / moved.targets - float(theirs)) > 1e-5, field


def test_the_kl_estimate_is_a_floor_at_zero_and_a_tie_counts_half():
    settings = KtoConfig(beta=1.0)
    logps = torch.tensor([-1.0, -3.0, -2.0])
    reference = torch.tensor([-2.0, -2.0, -2.0])
    desirable = torch.tensor([True, False, True])
    scores = kto_scores(logps, reference, torch.tensor(0.0), desirable, settings)
    assert scores.rewards.tolist() == [1.0, -1.0, 0.0]
    assert scores.losses[2].item() == pytest.approx(0.5)  # policy = reference, KL 0: 1 - sigmoid(0)
    from lmscale.objectives.kto import kl_estimate, kto_figures

    assert float(kl_estimate(torch.tensor([-1.0, -2.0]))) == 0.0  # a negative estimate is clamped
    figures = figure_means({k: float(v) for k, v in kto_figures(scores, torch.tensor(0.2)).items()}, 3)
    assert figures == pytest.approx(
        {
            "kl": 0.2,
            "label_accuracy": 2.5 / 3,
            "rewards_chosen": 0.5,
            "rewards_rejected": -1.0,
            "rewards_margin": 1.5,
        }
    )


def test_kto_trains_on_unpaired_records_and_says_so_in_one_line():
    raw = {"finetune": {"method": "kto"}, "data": {"format": "unpaired", "max_seq_len": 128}}
    config = build_config(raw)
    kto = method_for(config.finetune)
    assert kto.name == "kto" and kto.needs_reference and kto.dropout_off and method_problems(config) == []
    with pytest.raises(ConfigError, match="finetune.method=kto trains on data.format unpaired: set "):
        build_config({**raw, "data": {"format": "preference"}})
    with pytest.raises(
        ConfigError, match="data.format=unpaired is for another method: set finetune.method=kto"
    ):
        build_config({"data": {"format": "unpaired"}})
    with pytest.raises(ConfigError, match="cannot hold a record's two sequences"):
        build_config({**raw, "data": {"format": "unpaired", "max_seq_len": 128, "max_tokens_per_batch": 200}})
    with pytest.raises(ConfigError, match="data.packing"):
        build_config({**raw, "data": {"format": "unpaired", "packing": True}})
