import json
from itertools import islice

import numpy as np
import pytest

from lmscale.config import DataConfig
from lmscale.data.batches import BatchSettings
from lmscale.data.pipeline import prepare_data
from lmscale.data.streaming import (
    BufferedBuckets,
    StreamingBatches,
    StreamSettings,
    is_held_out,
    rank_shard,
    stream_documents,
)
from lmscale.data.tokenize import split_into_sequences
from lmscale.errors import ConfigError


def corpus(tmp_path, n=300, duplicates=0):
    rng = np.random.default_rng(0)
    texts = [
        " ".join(f"word{int(w)}" for w in rng.integers(0, 50, size=int(rng.integers(5, 120))))
        for _ in range(n)
    ]
    texts += texts[:duplicates]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    return path


def test_held_out_split_is_by_content():
    texts = [f"document {i}" for i in range(5000)]
    held = [t for t in texts if is_held_out(t, 0.1)]
    assert 400 < len(held) < 600
    assert held == [t for t in texts if is_held_out(t, 0.1)]


def test_stream_documents_keeps_eval_apart(tmp_path):
    config = DataConfig(path=str(corpus(tmp_path)), streaming=True, eval_fraction=0.1, min_chars=1)
    documents = stream_documents(config)
    train_texts = {r["text"] for r in documents.train}
    assert set(documents.eval["text"]).isdisjoint(train_texts)
    assert len(documents.eval) > 10 and len(documents.tokenizer_sample) > 100


def batches_of_one_epoch(tmp_path, world_size, rank, duplicates=0, budget=256):
    config = DataConfig(
        path=str(corpus(tmp_path, duplicates=duplicates)),
        streaming=True,
        min_chars=1,
        vocab_size=300,
        max_seq_len=64,
        max_tokens_per_batch=budget,
        cache_dir=str(tmp_path / "c"),
    )
    data = prepare_data(config, rank=rank, world_size=world_size)
    settings = StreamSettings(
        BatchSettings("bucket", budget, 1, 64, 0), buffer_size=50, dedup=True, seed=1, rank=rank
    )
    stream = BufferedBuckets(data.train, data.tokenizer, settings, pad_id=data.tokenizer.pad_token_id)
    epoch = list(stream._epoch(worker_id=0, epoch=0, start=None))
    return data, epoch


def test_buffered_buckets_respect_the_budget_and_cover_the_epoch(tmp_path):
    data, epoch = batches_of_one_epoch(tmp_path, world_size=1, rank=0, duplicates=40)
    assert all(b["input_ids"].numel() <= 256 for b in epoch)
    assert all(0 <= b.padded_tokens - b.real_tokens for b in epoch)
    rows_per_batch = [b["input_ids"].shape[0] for b in epoch]
    assert max(rows_per_batch) > 2 * min(rows_per_batch)
    unique_docs = {r["text"] for r in data.train}
    eos = data.tokenizer.eos_token_id
    pieces = [
        split_into_sequences([*data.tokenizer(t, add_special_tokens=False)["input_ids"], eos], 64)
        for t in unique_docs
    ]
    tokens = sum(len(p) for doc in pieces for p in doc)
    assert sum(b.real_tokens for b in epoch) == tokens  # every unique document once, duplicates dropped
    assert sum(b.local_targets for b in epoch) == int(
        sum((b["attention_mask"].sum(1) - 1).sum() for b in epoch)
    )


def test_ranks_read_disjoint_shards(tmp_path):
    config = DataConfig(path=str(corpus(tmp_path)), streaming=True, min_chars=1)
    documents = stream_documents(config)
    shards = [[r["text"] for r in rank_shard(documents.train, rank, 2)] for rank in (0, 1)]
    assert set(shards[0]).isdisjoint(shards[1])
    assert len(shards[0]) + len(shards[1]) == sum(1 for _ in documents.train)


def test_endless_iteration_repeats_epochs(tmp_path):
    data, epoch = batches_of_one_epoch(tmp_path, world_size=1, rank=0)
    settings = StreamSettings(
        BatchSettings("bucket", 256, 1, 64, 0), buffer_size=50, dedup=True, seed=1, rank=0
    )
    stream = BufferedBuckets(data.train, data.tokenizer, settings, pad_id=0)
    assert len(list(islice(iter(stream), 2 * len(epoch) + 1))) == 2 * len(epoch) + 1


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"near_dedup": True}, "data.near_dedup needs the whole corpus"),
        ({"batching": "pack"}, "data.batching=pack does not stream"),
    ],
)
def test_streaming_refuses_what_it_cannot_do(keys, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(streaming=True, **keys)


def test_missing_stream_path_names_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        stream_documents(DataConfig(path=str(tmp_path / "nope.jsonl"), streaming=True))


@pytest.mark.parametrize("workers", [0, 1])
def test_streaming_batches_resume_exactly_where_they_stopped(tmp_path, workers):
    config = DataConfig(
        path=str(corpus(tmp_path, n=900, duplicates=60)),
        streaming=True,
        min_chars=1,
        vocab_size=300,
        max_seq_len=64,
        cache_dir=str(tmp_path / "c"),
    )
    data = prepare_data(config)
    settings = StreamSettings(
        BatchSettings("bucket", 256, 1, 64, workers), buffer_size=50, dedup=True, seed=1, rank=0
    )
    reference = StreamingBatches(data.train, data.tokenizer, settings)
    uninterrupted = [b["input_ids"].tolist() for b in islice(iter(reference), 400)]  # more than an epoch
    for stop_at in (7, 180, 333):
        first = StreamingBatches(data.train, data.tokenizer, settings)
        consumed = list(islice(iter(first), stop_at))
        state = json.loads(json.dumps(first.state_dict()))  # as stored in the checkpoint
        resumed = StreamingBatches(data.train, data.tokenizer, settings)
        assert resumed.load_state_dict(state)
        rest = [b["input_ids"].tolist() for b in islice(iter(resumed), 400 - stop_at)]
        assert [b["input_ids"].tolist() for b in consumed] + rest == uninterrupted, stop_at


def test_streaming_state_from_other_workers_starts_over(tmp_path):
    data, _ = batches_of_one_epoch(tmp_path, world_size=1, rank=0)
    settings = StreamSettings(
        BatchSettings("bucket", 256, 1, 64, 0), buffer_size=50, dedup=True, seed=1, rank=0
    )
    stream = StreamingBatches(data.train, data.tokenizer, settings)
    assert not stream.load_state_dict({"streaming": True, "num_workers": 3, "positions": {}})
    assert not stream.load_state_dict({"streaming": True})
