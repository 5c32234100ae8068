"""Cached tokenization into sequences of at most `max_seq_len` tokens, and the batches fed to the model."""

from __future__ import annotations

import hashlib
import json

import torch
from datasets import Dataset
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label value the HF loss skips: padding is never a target
TOKENIZE_VERSION = "1"  # bump when tokenize_documents changes what it writes, to invalidate caches


def _tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
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


def tokenize_documents(documents: Dataset, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> Dataset:
    """Tokenize (EOS after each document), split long documents, store each sequence's length.

    The `datasets` cache is keyed by an explicit fingerprint of (documents, tokenizer, max_seq_len), so a
    second run with the same inputs reads the cached Arrow file instead of tokenizing again.
    """
    eos = tokenizer.eos_token_id
    key = f"{documents._fingerprint}-{_tokenizer_digest(tokenizer)}-{max_seq_len}-{TOKENIZE_VERSION}"
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]

    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        sequences = [s for ids in encoded for s in split_into_sequences([*ids, eos], max_seq_len)]
        return {"input_ids": sequences, "length": [len(s) for s in sequences]}

    return documents.map(
        encode,
        batched=True,
        remove_columns=documents.column_names,
        new_fingerprint=fingerprint,
        desc="tokenizing",
    )


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of sequences to the longest; labels are the inputs with padding ignored."""
    longest = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        ids = example["input_ids"]
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class Collator:
    """Picklable collate function for DataLoader worker processes."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return collate(examples, self.pad_id)


def make_loader(
    sequences: Dataset,
    micro_batch_size: int,
    pad_id: int,
    rank: int,
    world_size: int,
    seed: int,
    shuffle: bool,
    num_workers: int,
) -> DataLoader:
    """A DataLoader over this rank's shard of `sequences` (call `sampler.set_epoch` each epoch)."""
    sampler = DistributedSampler(
        sequences, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=shuffle
    )
    return DataLoader(
        sequences.with_format(columns=["input_ids"]),
        batch_size=micro_batch_size,
        sampler=sampler,
        collate_fn=Collator(pad_id),
        num_workers=num_workers,
        drop_last=shuffle,
        persistent_workers=num_workers > 0,
    )
