"""`lmscale score`: a reward model's score of each record of a jsonl file, written as jsonl (each record with
a `reward` field), batched by length so that little of the work is padding."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from lmscale.atomic import write_atomically
from lmscale.data.batches import collate
from lmscale.data.tasks import chat_prompt_and_completion, ensure_chat_template
from lmscale.errors import LmscaleError
from lmscale.evaluation.inference import is_sequence_classifier, load_for_inference
from lmscale.model.build import context_length

log = logging.getLogger(__name__)


def read_records(path: Path) -> list[dict]:
    """The file's records as written. Read by hand, not through the data layer's `datasets` loaders: those go
    through Arrow, which gives every record every other record's fields (as null) and unifies types, and the
    scored file must be each record unchanged plus its `reward`."""
    if not path.is_file():
        raise LmscaleError(f"--data {path} does not exist: give a jsonl file of records to score")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise LmscaleError(f"{path} line {number} is not JSON: fix it") from None
        if not isinstance(record, dict) or not (
            {"messages"} <= set(record) or {"prompt", "completion"} <= set(record)
        ):
            raise LmscaleError(
                f"{path} line {number} has neither `messages` nor `prompt` and `completion`: give one of them"
            )
        records.append(record)
    return records


def record_ids(record: dict, tokenizer, limit: int | None = None) -> list[int]:
    """The record as the reward model was trained on a reply: prompt + reply + EOS, the two tokenized apart,
    cut to `limit` tokens as training cut a reply at data.max_seq_len."""
    if "messages" in record:
        prompt, reply = chat_prompt_and_completion(record["messages"], tokenizer)
    else:
        prompt, reply = str(record["prompt"]), str(record["completion"])
    encoded = tokenizer([prompt, reply], add_special_tokens=False)["input_ids"]
    return [*encoded[0], *encoded[1], tokenizer.eos_token_id][:limit]


def length_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices in order of length, in batches of at most `max_tokens` padded tokens (one row at least)."""
    batches, current = [], []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        if current and (len(current) + 1) * lengths[index] > max_tokens:
            batches.append(current)
            current = []
        current.append(index)
    return batches + ([current] if current else [])


@torch.no_grad()
def rewards_of(model, rows: list[list[int]], pad_id: int, max_tokens: int) -> list[float]:
    rewards = [0.0] * len(rows)
    for batch in length_batches([len(r) for r in rows], max_tokens):
        tensors = collate([rows[i] for i in batch], pad_id)
        inputs = {name: tensors[name] for name in ("input_ids", "attention_mask")}
        scores = model(**inputs).logits[:, 0].float()
        for index, score in zip(batch, scores.tolist(), strict=True):
            rewards[index] = score
    return rewards


def score_command(target: Path, data: Path, out: Path | None, max_tokens: int) -> Path:
    """Score every record of `data` with the reward model at `target`; returns the file written."""
    model, tokenizer = load_for_inference(target)
    if not is_sequence_classifier(model) or getattr(model.config, "num_labels", None) != 1:
        raise LmscaleError(
            f"{target} is not a reward model (one-output head): train one with finetune.method=reward"
        )
    records = read_records(data)
    if any("messages" in record for record in records):
        ensure_chat_template(tokenizer)
    limit = context_length(model.config)
    rows = [record_ids(record, tokenizer, limit) for record in records]
    cut = sum(len(row) == limit for row in rows)
    if cut:
        log.warning("score: %d record(s) cut to the model's %d positions (scored on their start)", cut, limit)
    rewards = rewards_of(model, rows, tokenizer.pad_token_id, max_tokens)
    out = out or data.with_name(f"{data.stem}.rewards.jsonl")
    write_atomically(
        out, "".join(json.dumps({**r, "reward": s}) + "\n" for r, s in zip(records, rewards, strict=True))
    )
    return out
