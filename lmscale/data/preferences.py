"""Preference pairs for DPO: a prompt with a chosen and a rejected reply, as two token sequences.

A pair is one row of the tokenized dataset: `input_ids` (prompt + chosen + EOS) and `rejected_ids`
(prompt + rejected + EOS) share `prompt_len` masked tokens. It is planned as one unit, so both replies
always land in the same micro-batch on the same rank; its `length` is what it costs there (two rows as
wide as the longer reply), `tokens` what it holds, and `targets` is 1: DPO's loss is a mean over pairs.

Replies are text with a text `prompt`, or message lists: with a `prompt` message list they continue it;
without one, `chosen` and `rejected` are whole conversations that differ only in the last message.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from lmscale.data.chat import chat_problem
from lmscale.data.tasks import chat_prompt_and_completion, instruction_sequence, missing_field

EMPTY_PAIR = {
    "input_ids": [],
    "rejected_ids": [],
    "prompt_len": 0,
    "length": 0,
    "tokens": 0,
    "targets": 0,
    "margin": 0.0,
}


def conversations(prompt, chosen: list, rejected: list) -> tuple[list, list] | str:
    """The two whole conversations of a message-list pair, or why there are none."""
    if isinstance(prompt, list) and prompt:
        chosen, rejected = [*prompt, *chosen], [*prompt, *rejected]
    for messages in (chosen, rejected):
        problem = chat_problem(messages)
        if problem:
            return problem
    if chosen[:-1] != rejected[:-1]:
        return "chosen and rejected must share every message but the last (the replies compared)"
    return chosen, rejected


def pair_texts(prompt, chosen, rejected, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str, str] | str:
    """(prompt, chosen reply, rejected reply) as text, or why the record cannot be used."""
    absent = missing_field({"chosen": chosen, "rejected": rejected})
    if absent:
        return absent
    if isinstance(chosen, list) and isinstance(rejected, list):
        whole = conversations(prompt, chosen, rejected)
        if isinstance(whole, str):
            return whole
        prompt_text, chosen_text = chat_prompt_and_completion(whole[0], tokenizer)
        rejected_prompt, rejected_text = chat_prompt_and_completion(whole[1], tokenizer)
        if rejected_prompt != prompt_text:
            return "chosen and rejected render different prompts"
        return prompt_text, chosen_text, rejected_text
    texts = (prompt or "", chosen, rejected)
    if not all(isinstance(t, str) for t in texts) or not chosen.strip() or not rejected.strip():
        return "prompt, chosen and rejected must be strings (or chosen/rejected message lists), the replies non-empty"
    return texts


def pair_sequences(
    prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], eos: int, max_seq_len: int
) -> dict | None:
    """The pair's two sequences cut to max_seq_len; None when either reply has no target left."""
    chosen = instruction_sequence(prompt_ids, chosen_ids, eos, max_seq_len)
    rejected = instruction_sequence(prompt_ids, rejected_ids, eos, max_seq_len)
    if chosen is None or rejected is None:
        return None
    return {
        "input_ids": chosen["input_ids"],
        "rejected_ids": rejected["input_ids"],
        "prompt_len": len(prompt_ids),
        "length": 2 * max(chosen["length"], rejected["length"]),
        "tokens": chosen["length"] + rejected["length"],
        "targets": 1,
    }


def encode_preferences(batch: dict, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> dict:
    """`datasets.map` function: preference records -> pair rows (with a `problem` for unusable ones)."""
    rows: dict[str, list] = {key: [] for key in [*EMPTY_PAIR, "problem"]}
    count = len(batch["chosen"])
    prompts = batch.get("prompt") or [None] * count
    margins = batch.get("margin") or [None] * count
    for i in range(count):
        texts = pair_texts(prompts[i], batch["chosen"][i], batch["rejected"][i], tokenizer)
        pair, problem = None, texts if isinstance(texts, str) else None
        if problem is None and not isinstance(margins[i], int | float | None):
            problem = "margin must be a number"
        if problem is None:
            encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
            pair = pair_sequences(*encoded, tokenizer.eos_token_id, max_seq_len)
            problem = None if pair is not None else "too long"
        if pair is not None:
            pair["margin"] = float(margins[i] or 0.0)
        for key, value in (pair or EMPTY_PAIR).items():
            rows[key].append(value)
        rows["problem"].append(problem or "")
    return rows


def preference_text(batch: dict) -> list[str]:
    """Each record's strings joined, to train a tokenizer on when no pretrained one is given."""
    count = len(batch["chosen"])
    prompts = batch.get("prompt") or [None] * count
    return [
        "\n".join(text_of(v) for v in (prompts[i], batch["chosen"][i], batch["rejected"][i]))
        for i in range(count)
    ]


def text_of(value) -> str:
    if isinstance(value, list):
        return "\n".join(str(m.get("content", "")) for m in value if isinstance(m, dict))
    return str(value or "")
