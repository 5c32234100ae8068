import json
import logging

import pytest
import torch
from datasets import Dataset

from lmscale.config import DataConfig
from lmscale.data.batches import IGNORE_INDEX, BatchSettings, BatchStream, collate
from lmscale.data.pipeline import prepare_data
from lmscale.data.tokenize import split_into_sequences, tokenize_documents
from lmscale.data.tokenizer import trained_tokenizer
from lmscale.errors import ConfigError


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


def test_second_run_says_it_used_the_cache(tmp_path, caplog):
    config = DataConfig(
        path=str(small_corpus(tmp_path)), vocab_size=300, max_seq_len=32, cache_dir=str(tmp_path / "c")
    )
    with caplog.at_level(logging.INFO):
        prepare_data(config)
    assert "tokenizing" in caplog.text and "found in the cache" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        prepare_data(config)
    assert "data/train: tokenized sequences found in the cache; nothing to tokenize" in caplog.text
    assert "tokenizer: reusing" in caplog.text


def test_empty_after_cleaning_and_bad_tokenizer_dir_name_the_fix(tmp_path):
    path = tmp_path / "short.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"x{i}"}) for i in range(10)))
    with pytest.raises(ConfigError, match="empty after cleaning.*data.min_chars"):
        prepare_data(DataConfig(path=str(path), cache_dir=str(tmp_path / "c")))
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="data.tokenizer=.* holds no loadable tokenizer"):
        prepare_data(
            DataConfig(
                path=str(small_corpus(tmp_path)),
                tokenizer=str(tmp_path / "tok"),
                cache_dir=str(tmp_path / "c"),
            )
        )


def small_bucketed_data(tmp_path):
    """200 small documents tokenized, and bucket settings of 96 tokens per batch."""
    config = DataConfig(
        path=str(small_corpus(tmp_path, n=200)), vocab_size=300, max_seq_len=32, cache_dir=str(tmp_path / "c")
    )
    settings = BatchSettings(
        batching="bucket", max_tokens_per_batch=96, micro_batch_size=4, max_seq_len=32, num_workers=0
    )
    return prepare_data(config), settings


def test_stream_resumes_mid_epoch_with_exactly_the_unseen_batches(tmp_path):
    data, settings = small_bucketed_data(tmp_path)
    stream = BatchStream(data.train, settings, rank=0, world_size=1, seed=3, pad_id=0)
    per_epoch = len(stream.plan(0))
    batches = iter(stream)
    seen = [next(batches)["input_ids"].tolist() for _ in range(per_epoch + 3)]  # into the second epoch
    resumed = BatchStream(data.train, settings, rank=0, world_size=1, seed=3, pad_id=0)
    state = {"seed": 3, "epoch": 0, "cursor": 5, "world_size": 1}
    resumed.load_state_dict(state)
    rest = [b["input_ids"].tolist() for _, b in zip(range(per_epoch - 5 + 3), resumed, strict=False)]
    assert rest == seen[5:]
    assert resumed.state_dict() == {"seed": 3, "epoch": 1, "cursor": 3, "world_size": 1, "segments": []}


def test_stream_written_by_two_ranks_resumes_on_one_without_skipping_or_repeating(tmp_path):
    data, settings = small_bucketed_data(tmp_path)
    ranks = [BatchStream(data.train, settings, rank=r, world_size=2, seed=3, pad_id=0) for r in (0, 1)]
    done = 4
    streams = [iter(stream) for stream in ranks]
    seen = [next(it) for _ in range(done) for it in streams]
    state = ranks[0].state_dict()
    assert state["cursor"] == done and state["world_size"] == 2

    alone = BatchStream(data.train, settings, rank=0, world_size=1, seed=3, pad_id=0)
    alone.load_state_dict(state)
    assert alone.state_dict()["segments"] == [[2, done]] and alone.cursor == 0
    batches = iter(alone)
    rest = [next(batches) for _ in range(len(alone.plan(0)))]
    next(batches)  # the next epoch is planned for one rank as usual
    assert alone.state_dict() == {"seed": 3, "epoch": 1, "cursor": 1, "world_size": 1, "segments": []}
    rows = sum(batch.sequences for batch in seen + rest)
    assert rows == len(data.train)  # every sequence once: none skipped, none repeated
    tokens = sum(batch.real_tokens for batch in seen + rest)
    assert tokens == int(sum(data.train["length"]))
