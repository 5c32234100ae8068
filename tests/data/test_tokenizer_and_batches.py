import json

import torch
from datasets import Dataset

from lmscale.config import DataConfig
from lmscale.data import prepare_data
from lmscale.data.batches import IGNORE_INDEX, collate, split_into_sequences, tokenize_documents
from lmscale.data.tokenizer import trained_tokenizer


def small_corpus(tmp_path, n=60):
    path = tmp_path / "corpus.jsonl"
    lines = [
        json.dumps({"text": f"def function_{i}(x):\n    return x * {i} + {i * 7}\n" * (1 + i % 5)})
        for i in range(n)
    ]
    path.write_text("\n".join(lines))
    return path


def test_split_into_sequences_keeps_every_token():
    ids = list(range(10))
    assert split_into_sequences(ids, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert split_into_sequences(list(range(9)), 4) == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
    ]  # a lone token has no target


def test_collate_pads_and_ignores_padding():
    batch = collate([[5, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert collate([[5, 6]], pad_id=0, pad_to=4)["input_ids"].tolist() == [[5, 6, 0, 0]]


def test_filler_batch_has_no_targets():
    batch = collate([], pad_id=0)
    assert batch["input_ids"].shape == (1, 1)
    assert (batch["labels"] == IGNORE_INDEX).all()


def test_tokenizer_round_trips_code_and_is_cached(tmp_path):
    docs = Dataset.from_dict({"text": ["def f(x):\n    return x + 1\n", "class A:\n    pass\n"] * 20})
    tokenizer = trained_tokenizer(docs, 300, str(tmp_path))
    text = "def g(y):\n    return y  # ünïcode\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    again = trained_tokenizer(docs, 300, str(tmp_path))
    assert again.get_vocab() == tokenizer.get_vocab()
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1


def test_long_documents_are_split_not_dropped(tmp_path):
    docs = Dataset.from_dict({"text": ["word " * 500, "short"]})
    tokenizer = trained_tokenizer(docs, 300, str(tmp_path))
    sequences = tokenize_documents(docs, tokenizer, max_seq_len=32)
    assert max(sequences["length"]) == 32
    total = sum(sequences["length"])
    expected = sum(len(tokenizer(t)["input_ids"]) + 1 for t in docs["text"])  # + EOS per document
    assert expected - total < 2 * len(docs)  # at most a lone trailing token per document is dropped


def test_prepare_data_second_run_uses_the_cache(tmp_path):
    config = DataConfig(
        path=str(small_corpus(tmp_path)),
        vocab_size=300,
        max_seq_len=32,
        cache_dir=str(tmp_path / "c"),
        eval_fraction=0.1,
    )
    first = prepare_data(config)
    cached_files = sorted((tmp_path / "c").rglob("cache-*.arrow"))
    assert cached_files  # tokenized sequences were written to the datasets cache
    second = prepare_data(config)
    assert sorted((tmp_path / "c").rglob("cache-*.arrow")) == cached_files  # nothing new was tokenized
    assert list(first.train["input_ids"]) == list(second.train["input_ids"])
    assert len(first.eval) > 0
    assert all(s[-1] == first.tokenizer.eos_token_id or len(s) == 32 for s in first.train["input_ids"])
    assert torch.tensor(first.train["length"]).max() <= 32
