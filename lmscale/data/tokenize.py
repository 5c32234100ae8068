"""Cached tokenization: documents -> token sequences of at most `max_seq_len`, each with its length stored."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

TOKENIZE_VERSION = "1"  # bump when tokenize_documents changes what it writes, to invalidate caches


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    state = (
        tokenizer.backend_tokenizer.to_str()
        if tokenizer.is_fast
        else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    )
    return hashlib.sha256(state.encode()).hexdigest()[:16]


def split_into_sequences(token_ids: list[int], max_seq_len: int) -> list[list[int]]:
    """Cut one document's tokens into pieces of at most max_seq_len; pieces under 2 tokens have no target."""
    pieces = [token_ids[i : i + max_seq_len] for i in range(0, len(token_ids), max_seq_len)]
    return [p for p in pieces if len(p) >= 2]


def _cached(dataset: Dataset, fingerprint: str) -> bool:
    """Whether `datasets` already holds the result of a map with this fingerprint next to `dataset`."""
    if not dataset.cache_files:
        return False
    directory = Path(dataset.cache_files[0]["filename"]).parent
    return any(directory.glob(f"cache-{fingerprint}*.arrow"))


def tokenize_documents(
    documents: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    num_proc: int = 1,
    split: str = "train",
) -> Dataset:
    """Tokenize (EOS after each document), split long documents, store each sequence's length.

    The `datasets` cache is keyed by an explicit fingerprint of (documents, tokenizer, max_seq_len), so a
    second run with the same inputs reads the cached Arrow file instead of tokenizing again.
    """
    eos = tokenizer.eos_token_id
    key = f"{documents._fingerprint}-{tokenizer_digest(tokenizer)}-{max_seq_len}-{TOKENIZE_VERSION}"
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
    if _cached(documents, fingerprint):
        log.info("data/%s: tokenized sequences found in the cache; nothing to tokenize", split)
    else:
        log.info("data/%s: tokenizing %d documents", split, len(documents))

    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        sequences = [s for ids in encoded for s in split_into_sequences([*ids, eos], max_seq_len)]
        return {"input_ids": sequences, "length": [len(s) for s in sequences]}

    return documents.map(
        encode,
        batched=True,
        num_proc=num_proc if len(documents) >= 2 * num_proc else 1,
        remove_columns=documents.column_names,
        new_fingerprint=fingerprint,
        desc="tokenizing",
    )
