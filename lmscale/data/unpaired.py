"""Unpaired preference records for KTO: a prompt and one completion, labelled desirable or not.

A record becomes one row of two sequences, planned as one unit like a preference pair: `input_ids`
(prompt + completion + EOS) and `kl_ids`, the same prompt followed by another record's completion. KTO's
reference point is the policy's KL divergence from the reference model, which it estimates on such
mismatched prompt/completion pairs. TRL rotates completions within each (sequential) batch; here the
mismatch is fixed once, when the data is prepared, so that the starting model scores every KL sequence in
the reference pass before training, batches can be shuffled and length-bucketed, and a resumed run sees
the same pairs. Each record borrows the completion of the record next in completion length (with another
prompt where one is near), so both of its rows are about as long and bucketing wastes little padding.

Records are text (`prompt`, `completion`), message lists (`prompt` messages continued by a `completion`
message list), or a whole conversation in `completion` whose last message is the one judged.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from lmscale.data.chat import chat_problem
from lmscale.data.preferences import text_of
from lmscale.data.tasks import chat_prompt_and_completion, instruction_sequence, missing_field

EMPTY_RECORD = {"input_ids": [], "prompt_len": 0, "desirable": 0, "length": 0, "targets": 0}
NEIGHBOURS_TRIED = 8  # how far along the length order a record looks for a completion of another prompt


def desirability(label) -> int | None:
    """1 for a desirable completion, 0 for an undesirable one; None when `label` says neither."""
    if isinstance(label, bool | np.bool_):
        return int(label)
    if isinstance(label, int | np.integer) and label in (0, 1):
        return int(label)
    return None


def unpaired_texts(prompt, completion, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str] | str:
    """(prompt, completion) as text, or why the record cannot be used."""
    absent = missing_field({"completion": completion})
    if absent:
        return absent
    if isinstance(completion, list):
        whole = [*prompt, *completion] if isinstance(prompt, list) else completion
        problem = chat_problem(whole)
        return problem if problem else chat_prompt_and_completion(whole, tokenizer)
    if not isinstance(prompt or "", str) or not isinstance(completion, str) or not completion.strip():
        return "prompt and completion must be strings (or message lists), the completion non-empty"
    return prompt or "", completion


def encode_unpaired(batch: dict, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> dict:
    """`datasets.map` function: unpaired records -> rows of one sequence (with a `problem` for unusable ones);
    `with_kl_sequences` adds each row's mismatched sequence once the split is whole."""
    rows: dict[str, list] = {key: [] for key in [*EMPTY_RECORD, "problem"]}
    count = len(batch["completion"])
    prompts = batch.get("prompt") or [None] * count
    for i in range(count):
        texts = unpaired_texts(prompts[i], batch["completion"][i], tokenizer)
        label = batch["label"][i]
        problem = texts if isinstance(texts, str) else None
        if problem is None and desirability(label) is None:
            problem = missing_field({"label": label}) or "label must be true or false"
        row = None
        if problem is None:
            prompt_ids, completion_ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
            sequence = instruction_sequence(prompt_ids, completion_ids, tokenizer.eos_token_id, max_seq_len)
            problem = None if sequence is not None else "too long"
            if sequence is not None:
                row = {"input_ids": sequence["input_ids"], "prompt_len": len(prompt_ids)}
                row |= {"desirable": desirability(label), "length": sequence["length"], "targets": 1}
        for key, value in (row or EMPTY_RECORD).items():
            rows[key].append(value)
        rows["problem"].append(problem or "")
    return rows


def kl_partners(prompts: list[tuple[int, ...]], completion_lengths: np.ndarray) -> np.ndarray:
    """For each record, the record whose completion its KL sequence borrows: the next one in completion
    length (the longest wraps round to the shortest), skipping up to NEIGHBOURS_TRIED that share its prompt."""
    order = np.argsort(completion_lengths, kind="stable")
    count = len(order)
    partners = np.empty(count, dtype=np.int64)
    for place, record in enumerate(order):
        candidates = [
            order[(place + step) % count] for step in range(1, min(NEIGHBOURS_TRIED, count - 1) + 1)
        ]
        different = [c for c in candidates if prompts[c] != prompts[record]]
        partners[record] = (different or candidates or [record])[0]
    return partners


def with_kl_sequences(rows: Dataset, max_seq_len: int) -> Dataset:
    """The rows with `kl_ids` (the prompt + the partner's completion, cut to max_seq_len) and the pair's
    planned cost: `length` two rows as wide as the longer, `tokens` what both hold."""
    ids, prompt_lens = rows["input_ids"], rows["prompt_len"]
    prompts = [tuple(i[:p]) for i, p in zip(ids, prompt_lens, strict=True)]
    completion_lengths = np.asarray([len(i) - p for i, p in zip(ids, prompt_lens, strict=True)])
    partners = kl_partners(prompts, completion_lengths)
    kl_ids = [[*prompts[i], *ids[j][prompt_lens[j] :]][:max_seq_len] for i, j in enumerate(partners.tolist())]
    lengths = [2 * max(len(a), len(b)) for a, b in zip(ids, kl_ids, strict=True)]
    tokens = [len(a) + len(b) for a, b in zip(ids, kl_ids, strict=True)]
    rows = rows.remove_columns(["length"])
    return rows.add_column("kl_ids", kl_ids).add_column("length", lengths).add_column("tokens", tokens)


def unpaired_text(batch: dict) -> list[str]:
    """Each record's strings joined, to train a tokenizer on when no pretrained one is given."""
    count = len(batch["completion"])
    prompts = batch.get("prompt") or [None] * count
    return [f"{text_of(prompts[i])}\n{text_of(batch['completion'][i])}" for i in range(count)]
