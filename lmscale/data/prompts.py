"""Prompts for online RL (GRPO): each record is a prompt to sample completions from, and whatever else the
reward functions need (an answer to check against, a test to run), kept as it is.

A record's prompt is text (`data.prompt_field`) or a conversation (`data.messages_field`, a message list
ending with a user turn, rendered with the tokenizer's chat template and the assistant's opening). Every other
field travels with the record untouched and reaches the reward functions by name, as TRL passes them.
A prompt must leave room for `finetune.grpo.max_new_tokens` within `data.max_seq_len`; longer ones are
dropped and counted, as other formats drop records that do not fit.
"""

from __future__ import annotations

import hashlib

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from lmscale.config import DataConfig
from lmscale.data.chat import chat_problem
from lmscale.data.tasks import ORIGIN, TASKS_VERSION, TaskFormat, check_problems, missing_field
from lmscale.data.tokenize import tokenizer_digest
from lmscale.errors import ConfigError

PROMPT_COLUMNS = ("input_ids", "length")  # what tokenizing adds to a record; the rest is the user's


def prompt_format(config: DataConfig) -> TaskFormat:
    """Text prompts or conversations; any other field of a record is kept for the reward functions."""
    fields = {config.prompt_field: "prompt", config.messages_field: "messages"}
    return TaskFormat("prompt", fields, optional=frozenset(fields.values()), keep_other_fields=True)


def prompt_text(record_prompt, messages, tokenizer: PreTrainedTokenizerBase) -> str:
    """The text the model continues: the prompt, or the conversation with the assistant's turn opened.
    Raises ValueError with the record's problem."""
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {role, content}")
        problem = chat_problem([*messages, {"role": "assistant", "content": "the reply"}])
        if problem:
            raise ValueError(problem)
        if messages[-1]["role"] == "assistant":
            raise ValueError("a prompt's messages must end with a user turn (the completion is the reply)")
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    absent = missing_field({"prompt": record_prompt})
    if absent:
        raise ValueError(absent)
    if not isinstance(record_prompt, str) or not record_prompt.strip():
        raise ValueError("prompt must be a non-empty string")
    return record_prompt


def encode_prompts(batch: dict, tokenizer: PreTrainedTokenizerBase, max_prompt_len: int) -> dict[str, list]:
    """`datasets.map` function: each record's prompt ids and length, or its problem."""
    count = len(batch[ORIGIN])
    prompts = batch.get("prompt") or [None] * count
    conversations = batch.get("messages") or [None] * count
    rows: dict[str, list] = {"input_ids": [], "length": [], "problem": []}
    for prompt, messages in zip(prompts, conversations, strict=True):
        try:
            text = prompt_text(prompt, messages, tokenizer)
        except ValueError as exc:
            ids, problem = [], str(exc)
        else:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            problem = "too long" if len(ids) > max_prompt_len else ""
        rows["input_ids"].append(ids)
        rows["length"].append(len(ids))
        rows["problem"].append(problem)
    return rows


def tokenize_prompts(
    records: Dataset,
    fmt: TaskFormat,
    tokenizer: PreTrainedTokenizerBase,
    config: DataConfig,
    split: str,
    completion_room: int,
) -> Dataset:
    """The records with their prompt ids, cached; prompts that leave fewer than `completion_room` tokens
    within data.max_seq_len are dropped (and counted)."""
    max_prompt_len = config.max_seq_len - completion_room
    if max_prompt_len < 1:
        raise ConfigError(
            f"finetune.grpo.max_new_tokens={completion_room} leaves no room for a prompt within "
            f"data.max_seq_len={config.max_seq_len}: raise data.max_seq_len or lower max_new_tokens"
        )
    key = "-".join(
        [records._fingerprint, tokenizer_digest(tokenizer), fmt.name, str(max_prompt_len)]
        + [str(getattr(tokenizer, "chat_template", "")), TASKS_VERSION]
    )
    prompts = records.map(
        encode_prompts,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "max_prompt_len": max_prompt_len},
        new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16],
        desc="tokenizing prompts",
    )
    prompts = check_problems(prompts, records[ORIGIN], fmt, split, config.on_bad_record)
    if len(prompts) == 0:
        raise ConfigError(f"the {split} data has no usable prompts: check data.path and data.prompt_field")
    return prompts.remove_columns(ORIGIN)


def reward_fields(prompts: Dataset) -> list[str]:
    """The records' own fields, passed to the reward functions by name (TRL passes every other column)."""
    return [name for name in prompts.column_names if name not in (*PROMPT_COLUMNS, "prompt", "messages")]
