"""Fine-tuning pieces without processes: unfreezing schedule, prompt masking, labels, LoRA wrapping, config."""

import json

import numpy as np
import pytest
import torch
from finetune_data import instruction_records, labelled_records, write_jsonl
from helpers import tiny_gpt2_config

from lmscale.config import (
    Config,
    DataConfig,
    FinetuneConfig,
    LoraConfig,
    UnfreezeConfig,
    build_config,
    load_config,
)
from lmscale.data.batches import collate, target_count
from lmscale.data.bucketing import plan_epoch
from lmscale.data.pipeline import prepare_data
from lmscale.data.tasks import (
    PLAIN_CHAT_TEMPLATE,
    chat_problem,
    chat_prompt_and_completion,
    instruction_sequence,
    label_names,
)
from lmscale.errors import ConfigError
from lmscale.model.build import count_parameters
from lmscale.model.finetune import Unfreezing, apply_lora, is_joined
from lmscale.objectives.loss import summed_loss
from lmscale.training.optim import build_optimizer, group_depths, params_by_depth
from lmscale.training.schedules import build_scheduler


def constant_lr(lr: float, max_steps: int, weight_decay: float = 0.1) -> Config:
    return build_config(
        {
            "optim": {"lr": lr, "weight_decay": weight_decay},
            "schedule": {"name": "constant", "warmup_steps": 0, "min_lr": 0.0},
            "train": {"max_steps": max_steps},
        }
    )


def gpt2(layers=3):
    from transformers import GPT2LMHeadModel

    config = tiny_gpt2_config(vocab_size=64)
    config.n_layer = layers
    return GPT2LMHeadModel(config)


# --- gradual unfreezing -------------------------------------------------------------------------


def test_unfreezing_from_the_top_opens_one_layer_every_n_steps():
    unfreeze = UnfreezeConfig(every_steps=10)
    layers = 3  # depths: 0 embeddings, 1-3 blocks, 4 final norm + head
    open_at = {
        step: [d for d in range(5) if is_joined(d, step, layers, unfreeze)] for step in (0, 9, 10, 29, 30)
    }
    assert open_at == {0: [3, 4], 9: [3, 4], 10: [2, 3, 4], 29: [1, 2, 3, 4], 30: [0, 1, 2, 3, 4]}
    bottom = UnfreezeConfig(every_steps=10, start_from="bottom")
    assert [d for d in range(5) if is_joined(d, 0, layers, bottom)] == [0, 1]
    assert all(is_joined(d, 7, layers, None) for d in range(5))


def test_unfreezing_switches_requires_grad_of_the_right_parameters_at_the_right_steps():
    model = gpt2(layers=3)
    unfreezing = Unfreezing(params_by_depth(model), 3, UnfreezeConfig(every_steps=2))

    def trainable_blocks(step):
        unfreezing.apply(step)
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        blocks = sorted({int(n.split(".")[2]) for n in names if n.startswith("transformer.h.")})
        return blocks, "transformer.wte.weight" in names, "transformer.ln_f.weight" in names

    assert trainable_blocks(0) == ([2], False, True)
    assert trainable_blocks(1) == ([2], False, True)
    assert trainable_blocks(2) == ([1, 2], False, True)
    assert trainable_blocks(4) == ([0, 1, 2], False, True)
    assert trainable_blocks(6) == ([0, 1, 2], True, True)
    # a resumed run sets the same state from the step alone, also going backwards
    assert trainable_blocks(0) == ([2], False, True)
    with unfreezing.everything_trainable():
        assert all(p.requires_grad for p in model.parameters())
    assert trainable_blocks(0) == ([2], False, True)


def test_frozen_layers_get_lr_zero_until_they_join_and_then_the_schedule():
    model = gpt2(layers=2)
    train = constant_lr(lr=1.0, max_steps=10)
    unfreeze = UnfreezeConfig(every_steps=3)
    optimizer = build_optimizer(model, train.optim, cpu_offload=False, by_depth=True)
    depths = group_depths(model, train.optim, by_depth=True)
    assert len(depths) == len(optimizer.param_groups) and set(depths) == {0, 1, 2, 3}
    from functools import partial

    gates = [partial(is_joined, d, num_layers=2, unfreeze=unfreeze) for d in depths]
    scheduler = build_scheduler(optimizer, train, gates)
    seen = []
    for _ in range(7):
        seen.append({d: g["lr"] for d, g in zip(depths, optimizer.param_groups, strict=True)})
        optimizer.step()
        scheduler.step()
    assert seen[0] == {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0}
    assert seen[3] == {0: 0.0, 1: 1.0, 2: 1.0, 3: 1.0}
    assert seen[6] == {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}


def test_a_layer_not_yet_joined_does_not_move_even_with_weight_decay():
    model = gpt2(layers=2)
    train = constant_lr(lr=0.1, max_steps=5, weight_decay=0.5)
    unfreeze = UnfreezeConfig(every_steps=100)
    optimizer = build_optimizer(model, train.optim, cpu_offload=False, by_depth=True)
    from functools import partial

    depths = group_depths(model, train.optim, by_depth=True)
    gates = [partial(is_joined, d, num_layers=2, unfreeze=unfreeze) for d in depths]
    scheduler = build_scheduler(optimizer, train, gates)
    unfreezing = Unfreezing(params_by_depth(model), 2, unfreeze)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(3):
        unfreezing.apply(step)
        model(input_ids=torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    after = dict(model.named_parameters())
    assert torch.equal(before["transformer.h.0.mlp.c_fc.weight"], after["transformer.h.0.mlp.c_fc.weight"])
    assert torch.equal(before["transformer.wte.weight"], after["transformer.wte.weight"])
    assert not torch.equal(
        before["transformer.h.1.mlp.c_fc.weight"], after["transformer.h.1.mlp.c_fc.weight"]
    )


# --- instruction data and prompt masking ---------------------------------------------------------


def test_prompt_tokens_are_masked_and_not_counted_as_targets():
    sequence = instruction_sequence([5, 6, 7], [8, 9], eos=1, max_seq_len=16)
    assert sequence == {"input_ids": [5, 6, 7, 8, 9, 1], "length": 6, "targets": 3, "target_spans": [[3, 6]]}
    batch = collate([sequence["input_ids"], [5, 8, 1]], pad_id=0, target_spans=[[[3, 6]], [[1, 3]]])
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 9, 1], [-100, 8, 1, -100, -100, -100]]
    assert target_count(batch["labels"]) == 3 + 2
    assert instruction_sequence(list(range(10)), [3], eos=1, max_seq_len=8) is None  # no room for a target


def test_the_loss_ignores_what_the_model_predicts_over_the_prompt():
    batch = collate([[5, 6, 7, 8, 9, 1]], pad_id=0, prompt_lens=[3])
    logits = torch.randn(1, 6, 16)
    changed = logits.clone()
    changed[0, :2] = torch.randn(2, 16) * 10  # predictions of prompt tokens 6 and 7
    assert torch.equal(summed_loss(logits, batch["labels"]), summed_loss(changed, batch["labels"]))
    changed[0, 3] += torch.randn(16)  # the prediction of completion token 9
    assert not torch.equal(summed_loss(logits, batch["labels"]), summed_loss(changed, batch["labels"]))


def test_plans_count_completion_targets_per_group():
    lengths = np.array([10, 12, 9, 30, 31])
    targets = np.array([2, 3, 1, 5, 4])
    plan = plan_epoch(lengths, 1, seed=0, epoch=0, max_tokens=64, targets=targets)
    assert plan.group_targets.sum() == targets.sum()
    for group, total in zip(plan.groups, plan.group_targets, strict=True):
        assert total == targets[np.concatenate(group)].sum()


def test_instruction_records_become_masked_sequences(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", instruction_records(120))
    config = DataConfig(
        path=str(path),
        format="prompt_completion",
        cache_dir=str(tmp_path / "cache"),
        vocab_size=300,
        max_seq_len=64,
    )
    data = prepare_data(config)
    row = data.train[0]
    [[start, end]] = row["target_spans"]  # the completion and its EOS
    prompt = data.tokenizer.decode(row["input_ids"][:start])
    assert prompt.startswith("def ") and prompt.endswith("\n")
    assert row["targets"] == end - start and end == row["length"]
    assert row["input_ids"][-1] == data.tokenizer.eos_token_id or row["length"] == 64


def test_chat_records_use_a_template_and_target_the_last_assistant_message():
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_tiny_bpe(), eos_token="<e>", pad_token="<p>")
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    prompt, completion = chat_prompt_and_completion(messages, tokenizer)
    assert prompt == "system: Be brief.\nuser: What is 2+2?\nassistant: "
    assert completion == "4\n"
    assert chat_problem(messages) is None
    assert "assistant" in chat_problem(messages[:2])
    assert chat_problem("hello") is not None


def _tiny_bpe():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<e>", "<p>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(["What is 2+2? Be brief. user assistant system"], trainer=trainer)
    return bpe


def test_a_bad_instruction_record_is_named_or_skipped(tmp_path):
    records = instruction_records(60)
    records[7] = {"prompt": "def f():\n", "completion": ""}
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    config = DataConfig(
        path=str(path), format="prompt_completion", cache_dir=str(tmp_path / "c"), vocab_size=300
    )
    with pytest.raises(ConfigError) as error:
        prepare_data(config)
    # the file's own line (records are shuffled and split before they are checked), and every field key
    assert f"1 unusable record(s): {path} line 8: prompt and completion must be strings" in str(error.value)
    assert "data.prompt_field='prompt', data.completion_field='completion'" in str(error.value)
    assert str(error.value).endswith("fix the record(s), or set data.on_bad_record=skip")
    del records[4]["completion"]  # a record without a field names it, at its line
    records.insert(2, {"prompt": "a", "completion": "b"})
    path.write_text(
        "\n".join(json.dumps(r) for r in records[:3]) + "\n\n" + "\n".join(json.dumps(r) for r in records[3:])
    )
    with pytest.raises(ConfigError) as error:
        prepare_data(config)
    message = str(error.value)
    assert (
        "2 unusable record(s): " + f"{path} line 7: it has no 'completion' field (data.completion_field)"
        in message
    )
    skipped = prepare_data(config.model_copy(update={"on_bad_record": "skip"}))
    assert len(skipped.train) + len(skipped.eval) == 59


def test_instruction_data_without_its_fields_names_the_key(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"question": "a", "answer": "b"}] * 10)
    config = DataConfig(path=str(path), format="prompt_completion", cache_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="no field 'prompt'.*set data.prompt_field"):
        prepare_data(config)


# --- classification ------------------------------------------------------------------------------


def test_label_names_keep_integer_ids_and_sort_names():
    from datasets import Dataset

    assert label_names(Dataset.from_dict({"label": [2, 0, 1, 0]}), None) == ["0", "1", "2"]
    assert label_names(Dataset.from_dict({"label": ["neg", "pos", "neg"]}), None) == ["neg", "pos"]
    with pytest.raises(ConfigError, match="finetune.num_labels=3 but the training data has 2 labels"):
        label_names(Dataset.from_dict({"label": ["neg", "pos"]}), 3)


def test_classification_batches_carry_one_label_per_row(tmp_path):
    path = write_jsonl(tmp_path / "cls.jsonl", labelled_records(100))
    config = DataConfig(path=str(path), cache_dir=str(tmp_path / "c"), vocab_size=300, eval_fraction=0.1)
    data = prepare_data(config, task="classification")
    assert data.labels == ["loop", "straight"]
    assert set(data.train["targets"]) == {1}
    batch = collate([[3, 4, 5], [6]], pad_id=0, classes=[1, 0])
    assert batch["labels"].tolist() == [1, 0]
    assert target_count(batch["labels"]) == 2
    assert target_count(collate([], pad_id=0, classes=[])["labels"]) == 0  # a filler row has no target


# --- LoRA and config -----------------------------------------------------------------------------


def test_lora_leaves_only_the_adapters_trainable():
    model = apply_lora(gpt2(), LoraConfig(r=4))
    trainable, total = count_parameters(model, trainable_only=True), count_parameters(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) < total / 5


def test_lora_target_modules_that_do_not_exist_name_the_real_ones():
    with pytest.raises(ConfigError, match=r"finetune.lora.target_modules=\['q_proj'\].*c_attn"):
        apply_lora(gpt2(), LoraConfig(target_modules=["q_proj"]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.format=chat", "data.batching=pack"], "data.batching=pack does not apply to data.format=chat"),
        (["data.format=prompt_completion", "data.streaming=true"], "data.streaming=True does not apply"),
        (
            ["finetune.task=classification", "data.format=chat"],
            "trains on data.format text: set data.format=text",
        ),
        (["finetune.unfreeze.start_from=top"], r"finetune.unfreeze.every_steps"),
        (["finetune.lora.rank=4"], "finetune.lora.rank: unknown key"),
        (["finetune.task=regression"], "finetune.task"),
    ],
)
def test_bad_finetune_configs_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(None, overrides)
    assert "\n" not in str(caught.value)


def test_finetune_defaults_train_every_layer_of_the_whole_model():
    config, _ = load_config(None, [])
    assert config.finetune == FinetuneConfig()
    assert config.finetune.lora is None and config.finetune.unfreeze is None
    assert config.finetune.task == "causal_lm"


def test_merge_is_refused_for_a_run_without_lora(tmp_path):
    from lmscale.checkpointing.export import export
    from lmscale.config import Config, config_to_yaml
    from lmscale.errors import LmscaleError

    (tmp_path / "config.yaml").write_text(config_to_yaml(Config()))
    with pytest.raises(LmscaleError, match="is not a LoRA run.*export it without --merge"):
        export(tmp_path, tmp_path / "out", merge=True)
    assert not (tmp_path / "out").exists()


def test_a_tiny_held_out_set_is_warned_about(tmp_path, caplog):
    path = write_jsonl(tmp_path / "sft.jsonl", instruction_records(60))
    config = DataConfig(
        path=str(path), format="prompt_completion", cache_dir=str(tmp_path / "c"), vocab_size=300
    )
    with caplog.at_level("WARNING", logger="lmscale"):
        data = prepare_data(config)
    assert len(data.eval) < 20
    assert f"the held-out set has only {len(data.eval)} record(s)" in caplog.text
    assert "raise data.eval_fraction or set data.eval_path" in caplog.text
