"""Fine-tuning data: instruction records whose loss covers only the completion, and labelled documents.

Records come from jsonl/json/parquet/csv files or `save_to_disk` directories. Each becomes one sequence
with its `length`, its count of loss `targets` (what the token-mean loss and the bucketing plan need),
and either a `prompt_len` (tokens masked out of the loss) or a class `label`. Tokenization goes through
`datasets.map` with an explicit fingerprint, so a second run reads the cache, as for pre-training data.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from lmscale.config import DataConfig
from lmscale.data.chat import MISSING, ChatLoss, chat_problem, chat_sequence
from lmscale.data.locations import is_hub_dataset
from lmscale.data.sources import (
    existing_source,
    is_table,
    load_documents,
    load_hub_dataset,
    load_table,
    record_origins,
)
from lmscale.data.tokenize import tokenizer_digest
from lmscale.errors import ConfigError

log = logging.getLogger(__name__)

TASKS_VERSION = "3"  # bump when the tokenization below changes what it writes
# Used when a tokenizer has no chat template of its own (e.g. one lmscale trained): one line per turn,
# and the prompt ends where the assistant's answer begins. Saved with the tokenizer, so generation
# from the fine-tuned model sees the same format.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


ORIGIN = "origin"  # a record's column naming its file and line, for errors about it


def missing_field(values: dict[str, object]) -> str | None:
    """The problem of a record lacking one of `values` ({field name here: value}), or None."""
    absent = [name for name, value in values.items() if value is None]
    return f"{MISSING}{absent[0]}" if absent else None


@dataclass(frozen=True)
class TaskFormat:
    name: str  # prompt_completion, chat, preference, unpaired or classification
    fields: dict[str, str]  # the column each record field is read from -> its name here (= data.<name>_field)
    optional: frozenset[str] = frozenset()  # names here a record may lack (a preference pair's prompt)
    keep_other_fields: bool = False  # a record's other fields stay (GRPO's reward functions read them)


def task_format(config: DataConfig, task: str) -> TaskFormat | None:
    """The fine-tuning record format the config asks for, or None for plain documents."""
    if task == "classification":
        return TaskFormat("classification", {config.text_field: "text", config.label_field: "label"})
    if config.format == "prompt_completion":
        return TaskFormat(
            "prompt_completion", {config.prompt_field: "prompt", config.completion_field: "completion"}
        )
    if config.format == "chat":
        return TaskFormat("chat", {config.messages_field: "messages"})
    if config.format == "preference":
        fields = {
            config.prompt_field: "prompt",
            config.chosen_field: "chosen",
            config.rejected_field: "rejected",
            config.margin_field: "margin",
        }
        return TaskFormat("preference", fields, optional=frozenset({"prompt", "margin"}))
    if config.format == "prompt":
        from lmscale.data.prompts import prompt_format  # it builds on this module

        return prompt_format(config)
    if config.format == "unpaired":
        fields = {
            config.prompt_field: "prompt",
            config.completion_field: "completion",
            config.label_field: "label",
        }
        return TaskFormat("unpaired", fields, optional=frozenset({"prompt"}))
    return None


def record_loader(fmt: TaskFormat):
    """A `load_documents` loader that reads a table source's records with this format's fields."""

    # A format that keeps every field requires none of them on a well-formed line.
    required = [] if fmt.keep_other_fields else list(fmt.fields)

    def load(path: str, config: DataConfig, cache_dir: str, key: str) -> Dataset:
        if is_hub_dataset(path):
            records = load_hub_dataset(path, config, cache_dir, key)
        else:
            source = existing_source(path, key)
            if not is_table(source):
                raise ConfigError(
                    f"{key}={path}: {fmt.name} data must be jsonl, json, parquet, csv, a save_to_disk "
                    "directory or a Hub dataset"
                )
            records = load_table(source, config, cache_dir, required)
        missing = [
            f for f in fmt.fields if f not in records.column_names and fmt.fields[f] not in fmt.optional
        ]
        if missing:
            raise ConfigError(
                f"{key}={path} has no field {', '.join(map(repr, missing))} (fields: "
                f"{', '.join(records.column_names)}): set data.{fmt.fields[missing[0]]}_field to the right field"
            )
        present = {k: v for k, v in fmt.fields.items() if k in records.column_names}
        if fmt.keep_other_fields and not present:
            raise ConfigError(
                f"{key}={path} has none of the fields {', '.join(map(repr, fmt.fields))} (fields: "
                f"{', '.join(records.column_names)}): set data.prompt_field or data.messages_field"
            )
        if not fmt.keep_other_fields:
            records = records.select_columns(list(present))
        records = records.rename_columns({k: v for k, v in present.items() if k != v})
        origins = (
            [f"{path} record {n + 1}" for n in range(len(records))]
            if is_hub_dataset(path)
            else record_origins(source, len(records), required)
        )
        return records.add_column(ORIGIN, origins)

    return load


def load_task_records(config: DataConfig, fmt: TaskFormat, cache_dir: str) -> tuple[Dataset, Dataset]:
    """(train, held-out) records of a fine-tuning format; the embedded corpus has none."""
    if config.path is None and not config.sources:
        raise ConfigError(
            f"{fmt.name} fine-tuning needs data: set data.path to a jsonl/parquet file of your records"
        )
    return load_documents(config, cache_dir, loader=record_loader(fmt))


def tokenizer_text(records: Dataset, fmt: TaskFormat) -> Dataset:
    """One `text` column of a format's records, to train a tokenizer on when no pretrained one is given."""

    def join(batch: dict) -> dict:
        if fmt.name == "preference":
            from lmscale.data.preferences import preference_text  # it builds on this module

            return {"text": preference_text(batch)}
        if fmt.name == "unpaired":
            from lmscale.data.unpaired import unpaired_text  # it builds on this module

            return {"text": unpaired_text(batch)}
        if fmt.name == "prompt_completion":
            return {"text": [f"{p}{c}" for p, c in zip(batch["prompt"], batch["completion"], strict=True)]}
        if fmt.name == "chat" or (fmt.name == "prompt" and "messages" in batch):
            return {
                "text": ["\n".join(str(m.get("content", "")) for m in ms or []) for ms in batch["messages"]]
            }
        if fmt.name == "prompt":
            return {"text": [str(p or "") for p in batch["prompt"]]}
        return {"text": [str(t) for t in batch["text"]]}

    return records.map(join, batched=True, remove_columns=records.column_names, desc="tokenizer text")


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "chat_template", None):
        log.info("data: the tokenizer has no chat template; using lmscale's plain 'role: content' lines")
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE


def chat_prompt_and_completion(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """The rendered conversation split where the last (assistant) message begins."""
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    if not whole.startswith(prompt):
        raise ConfigError(
            "the tokenizer's chat template renders the conversation without the reply as something other "
            "than a prefix of the whole: use data.format=prompt_completion, or a tokenizer with a standard template"
        )
    return prompt, whole[len(prompt) :]


def instruction_sequence(
    prompt_ids: list[int], completion_ids: list[int], eos: int, max_seq_len: int
) -> dict | None:
    """Prompt + completion + EOS cut to max_seq_len, the completion its target span; None when no target
    is left."""
    ids = [*prompt_ids, *completion_ids, eos][:max_seq_len]
    start = max(len(prompt_ids), 1)  # position 0 is never a target: nothing precedes it
    if len(ids) - start < 1:
        return None
    return {
        "input_ids": ids,
        "length": len(ids),
        "targets": len(ids) - start,
        "target_spans": [[start, len(ids)]],
    }


EMPTY_INSTRUCTION = {"input_ids": [], "length": 0, "targets": 0, "target_spans": []}


def encode_instructions(batch: dict, fmt: TaskFormat, tokenizer, max_seq_len: int, loss: ChatLoss) -> dict:
    rows: dict[str, list] = {name: [] for name in [*EMPTY_INSTRUCTION, "problem"]}
    count = len(next(iter(batch.values())))
    for i in range(count):
        if fmt.name == "chat":
            problem, sequence = chat_row(batch["messages"][i], tokenizer, max_seq_len, loss)
        else:
            problem, sequence = completion_row(
                batch["prompt"][i], batch["completion"][i], tokenizer, max_seq_len
            )
        for key, value in (sequence or EMPTY_INSTRUCTION).items():
            rows[key].append(value)
        rows["problem"].append(problem or "")
    return rows


def chat_row(messages, tokenizer, max_seq_len: int, loss: ChatLoss) -> tuple[str | None, dict | None]:
    """(problem, sequence) of one chat record."""
    problem = chat_problem(messages, loss)
    if problem:
        return problem, None
    chat = chat_sequence(messages, tokenizer, loss, max_seq_len)
    if chat is None:
        return "too long", None
    spans = [list(span) for span in chat.spans]
    return None, {
        "input_ids": chat.ids,
        "length": len(chat.ids),
        "targets": chat.targets,
        "target_spans": spans,
    }


def completion_row(prompt, completion, tokenizer, max_seq_len: int) -> tuple[str | None, dict | None]:
    """(problem, sequence) of one prompt/completion record."""
    ok = isinstance(prompt, str) and isinstance(completion, str) and completion.strip()
    problem = missing_field({"prompt": prompt, "completion": completion}) or (
        None if ok else "prompt and completion must be strings, the completion non-empty"
    )
    if problem:
        return problem, None
    encoded = tokenizer([prompt, completion], add_special_tokens=False)["input_ids"]
    sequence = instruction_sequence(encoded[0], encoded[1], tokenizer.eos_token_id, max_seq_len)
    return ("too long", None) if sequence is None else (None, sequence)


def encode_labelled(batch: dict, tokenizer, max_seq_len: int, label_ids: dict) -> dict:
    encoded = tokenizer([str(t) for t in batch["text"]], add_special_tokens=False)["input_ids"]
    ids = [[*e, tokenizer.eos_token_id][:max_seq_len] for e in encoded]
    labels = [label_ids.get(str(label), -1) for label in batch["label"]]
    problems = [
        missing_field({"text": text, "label": label})
        or ("" if label_id >= 0 else "label is not one of the training labels")
        for text, label, label_id in zip(batch["text"], batch["label"], labels, strict=True)
    ]
    return {
        "input_ids": ids,
        "length": [len(i) for i in ids],
        "targets": [1] * len(ids),
        "label": labels,
        "problem": problems,
    }


def label_names(train: Dataset, num_labels: int | None) -> list[str]:
    """Class names in id order: integer labels keep their values as ids, other labels are sorted."""
    values = train.unique("label")
    if all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values):
        count = num_labels or max(values) + 1
        if min(values) < 0 or max(values) >= count:
            raise ConfigError(
                f"integer labels must lie in 0..{count - 1} (found {min(values)}..{max(values)}): "
                "fix the data or finetune.num_labels"
            )
        return [str(i) for i in range(count)]
    names = sorted(str(v) for v in values)
    if num_labels is not None and num_labels != len(names):
        raise ConfigError(
            f"finetune.num_labels={num_labels} but the training data has {len(names)} labels: unset it or fix the data"
        )
    return names


def file_order(origin: str) -> tuple[str, int]:
    """Sort key of an origin ("PATH line N" / "PATH record N"): by file, then by number."""
    where, number = origin.rsplit(" ", 1)
    return where, int(number)


def describe_problem(problem: str, fmt: TaskFormat) -> str:
    """A record's problem in the user's terms: a missing field by the name it is read from."""
    if not problem.startswith(MISSING):
        return problem
    name = problem.removeprefix(MISSING)
    column = next((c for c, n in fmt.fields.items() if n == name), name)
    return f"it has no {column!r} field (data.{name}_field)"


def fields_read(fmt: TaskFormat) -> str:
    return ", ".join(f"data.{name}_field={column!r}" for column, name in fmt.fields.items())


def check_problems(
    sequences: Dataset, origins: list[str], fmt: TaskFormat, split: str, on_bad_record: str
) -> Dataset:
    """Stop on (or drop and count) records that could not become a sequence; too-long ones are dropped.
    `origins` names each record's file and line, in the order of `sequences`."""
    problems = sequences["problem"]
    too_long = [i for i, p in enumerate(problems) if p == "too long"]
    bad = sorted(
        (i for i, p in enumerate(problems) if p and p != "too long"), key=lambda i: file_order(origins[i])
    )
    if bad:
        first = f"{origins[bad[0]]}: {describe_problem(problems[bad[0]], fmt)}"
        others = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    if bad and on_bad_record == "error":
        raise ConfigError(
            f"the {split} data has {len(bad)} unusable record(s): {first}{others} (fields read: "
            f"{fields_read(fmt)}): fix the record(s), or set data.on_bad_record=skip"
        )
    if bad:
        log.warning("data/%s: skipped %d unusable record(s), first %s", split, len(bad), first)
    if too_long:
        log.warning(
            "data/%s: dropped %d record(s) whose prompt leaves no completion token within data.max_seq_len",
            split,
            len(too_long),
        )
    if bad or too_long:
        sequences = sequences.filter(lambda batch: [not p for p in batch["problem"]], batched=True)
    return sequences.remove_columns("problem")


def tokenize_records(
    records: Dataset,
    fmt: TaskFormat,
    tokenizer: PreTrainedTokenizerBase,
    config: DataConfig,
    split: str,
    labels: list[str] | None = None,
) -> Dataset:
    """Sequences of a fine-tuning format, cached by (records, tokenizer, format, max_seq_len, labels)."""
    key = "-".join(
        [records._fingerprint, tokenizer_digest(tokenizer), fmt.name, str(config.max_seq_len)]
        + [str(getattr(tokenizer, "chat_template", "")), str(labels), TASKS_VERSION]
        + ([config.chat_loss, config.train_field] if fmt.name == "chat" else [])
    )
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
    if fmt.name == "classification":
        label_ids = {name: i for i, name in enumerate(labels or [])}
        encode, kwargs = encode_labelled, {"max_seq_len": config.max_seq_len, "label_ids": label_ids}
    elif fmt.name == "preference":
        from lmscale.data.preferences import encode_preferences  # it builds on this module

        encode, kwargs = encode_preferences, {"max_seq_len": config.max_seq_len}
    elif fmt.name == "unpaired":
        from lmscale.data.unpaired import encode_unpaired  # it builds on this module

        encode, kwargs = encode_unpaired, {"max_seq_len": config.max_seq_len}
    else:
        loss = ChatLoss(config.chat_loss, config.train_field)
        encode, kwargs = encode_instructions, {"fmt": fmt, "max_seq_len": config.max_seq_len, "loss": loss}
    sequences = records.map(
        encode,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, **kwargs},
        num_proc=config.num_proc if len(records) >= 2 * config.num_proc else 1,
        remove_columns=records.column_names,
        new_fingerprint=fingerprint,
        desc=f"tokenizing {fmt.name}",
    )
    sequences = check_problems(sequences, records[ORIGIN], fmt, split, config.on_bad_record)
    if len(sequences) == 0:
        raise ConfigError(f"the {split} data has no usable {fmt.name} records: check data.path")
    if fmt.name == "unpaired":
        from lmscale.data.unpaired import with_kl_sequences

        sequences = with_kl_sequences(sequences, config.max_seq_len)
    return sequences


def dataset_summary(sequences: Dataset) -> str:
    if "targets" not in sequences.column_names:  # prompts (GRPO): nothing to learn from until sampled
        return f"{len(sequences)} prompts, {int(np.sum(sequences['length']))} tokens"
    if "rejected_ids" in sequences.column_names:
        return f"{len(sequences)} preference pairs, {int(np.sum(sequences['tokens']))} tokens"
    if "kl_ids" in sequences.column_names:
        desirable = int(np.sum(sequences["desirable"]))
        return f"{len(sequences)} records ({desirable} desirable), {int(np.sum(sequences['tokens']))} tokens"
    lengths = np.asarray(sequences["length"])
    targets = np.asarray(sequences["targets"])
    return f"{len(lengths)} sequences, {int(lengths.sum())} tokens, {int(targets.sum())} loss targets"
