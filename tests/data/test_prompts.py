"""GRPO's prompts: text or conversations (rendered with the assistant's turn opened), every other field kept
for the reward functions, prompts that leave no room for the completion dropped and counted."""

import json

from helpers import word_level_tokenizer

from lmscale.config import DataConfig
from lmscale.data.pipeline import prepare_data
from lmscale.data.prompts import reward_fields

TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant{% endif %}"
)


def prepare(tmp_path, records, completion_room=2, **data):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenizer = word_level_tokenizer(["user", "assistant", "one", "two", "three", "four"], TEMPLATE)
    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    config = DataConfig(
        path=str(path),
        format="prompt",
        tokenizer=str(tmp_path / "tokenizer"),
        eval_path=str(path),
        max_seq_len=8,
        cache_dir=str(tmp_path / "cache"),
        **data,
    )
    return prepare_data(config, completion_room=completion_room), tokenizer


def test_text_prompts_keep_their_fields_and_long_ones_are_dropped(tmp_path, caplog):
    records = [
        {"prompt": "one two", "answer": "three", "level": 1},
        {"prompt": "one two three four one two three", "answer": "x", "level": 2},  # 7 tokens > 8 - 2
    ]
    data, tokenizer = prepare(tmp_path, records)
    assert len(data.train) == 1 and "dropped 1 record(s)" in caplog.text
    row = data.train[0]
    assert tokenizer.convert_ids_to_tokens(row["input_ids"]) == ["one", "two"] and row["length"] == 2
    assert (row["answer"], row["level"]) == ("three", 1)
    assert reward_fields(data.train) == ["answer", "level"]


def test_conversations_open_the_assistant_s_turn(tmp_path):
    records = [{"conversation": [{"role": "user", "content": "one two"}], "answer": "three"}]
    data, tokenizer = prepare(tmp_path, records, messages_field="conversation")
    tokens = tokenizer.convert_ids_to_tokens(data.train[0]["input_ids"])
    assert tokens == ["user", "one", "two", "assistant"]
    assert data.train[0]["messages"] == records[0]["conversation"]  # read from data.messages_field
    assert reward_fields(data.train) == ["answer"]
