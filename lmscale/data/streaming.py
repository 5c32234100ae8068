"""`data.streaming`: corpora larger than memory, read with `datasets` streaming and tokenized on the fly.

Each rank reads its own shard (`split_dataset_by_node`), fills a buffer of `data.shuffle_buffer`
sequences, and forms length buckets inside it (the bucketing of `bucketing.py`, applied per buffer),
so batches stay nearly padding-free without a pass over the whole corpus. The stream repeats
epoch after epoch, so every rank always has a next batch and all ranks run the same number of steps.
A small held-out set and the tokenizer's training documents are taken from the stream up front.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, IterableDataset, interleave_datasets, load_dataset
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader

from lmscale.config import DataConfig
from lmscale.data.batches import Batch, BatchSettings, StreamPosition, collate, ignore_stop_signals
from lmscale.data.bucketing import fixed_batches, length_buckets
from lmscale.data.cleaning import clean_text, content_hash
from lmscale.data.locations import is_hub_dataset
from lmscale.data.sources import (
    LOADERS,
    SPLIT_SEED,
    directory_files,
    embedded_corpus_files,
    load_disk_dataset,
    load_hub_dataset,
)
from lmscale.data.tokenize import split_into_sequences
from lmscale.errors import ConfigError

log = logging.getLogger(__name__)

HELD_OUT_BUCKETS = 10_000
TOKENIZE_BATCH = 256  # documents tokenized together (the fast tokenizer parallelises a batch)


def is_held_out(text: str, eval_fraction: float) -> bool:
    """A fixed, content-based split: the same document is held out on every run and every rank."""
    return int(content_hash(text)[:8], 16) % HELD_OUT_BUCKETS < eval_fraction * HELD_OUT_BUCKETS


def _text_stream(stream: IterableDataset, field: str, source: str) -> IterableDataset:
    first = next(iter(stream), None)
    if first is None:
        raise ConfigError(f"data path {source} holds no records: point data.path at a non-empty corpus")
    if field not in first:
        raise ConfigError(
            f"data path {source} has no field {field!r} (fields: {', '.join(first)}): set data.text_field"
        )
    stream = stream.select_columns([field])
    return stream.rename_column(field, "text") if field != "text" else stream


def stream_source(path: str | None, config: DataConfig, key: str = "data.path") -> IterableDataset:
    """One source as a stream of {"text"} records (None = the embedded corpus's training files)."""
    if path is None:
        files = embedded_corpus_files()[0]
        return load_dataset("text", data_files=files, sample_by="document", streaming=True, split="train")
    if is_hub_dataset(path):
        return _text_stream(
            load_hub_dataset(path, config, None, key, streaming=True), config.text_field, path
        )
    source = Path(path).expanduser()
    if not source.exists():
        raise ConfigError(f"data path {path} does not exist: fix the path")
    if source.is_dir() and (
        (source / "dataset_info.json").exists() or (source / "dataset_dict.json").exists()
    ):
        return _text_stream(load_disk_dataset(source).to_iterable_dataset(), config.text_field, path)
    if source.is_dir():
        files = directory_files(source, config.glob)
        return load_dataset("text", data_files=files, sample_by="document", streaming=True, split="train")
    if source.suffix in LOADERS:
        stream = load_dataset(LOADERS[source.suffix], data_files=str(source), streaming=True, split="train")
        return _text_stream(stream, config.text_field, path)
    return load_dataset(
        "text", data_files=[str(source)], sample_by="paragraph", streaming=True, split="train"
    )


def _mixed_stream(config: DataConfig) -> IterableDataset:
    sources = [(s.path, s.weight) for s in config.sources] or [(config.path, 1.0)]
    streams = [stream_source(path, config) for path, _ in sources]
    if len(streams) == 1:
        return streams[0]
    total = sum(w for _, w in sources)
    probabilities = [w / total for _, w in sources]
    return interleave_datasets(
        streams, probabilities=probabilities, seed=SPLIT_SEED, stopping_strategy="all_exhausted"
    )


def _clean_stream(stream: IterableDataset, config: DataConfig, is_code: bool) -> IterableDataset:
    if not config.clean:
        return stream
    html = config.strip_html and not is_code
    stream = stream.map(
        lambda batch: {"text": [clean_text(t, config, html) for t in batch["text"]]}, batched=True
    )
    # Stateless steps only: a stream is read several times (samples, then every epoch), so exact
    # de-duplication happens per epoch in BufferedBuckets instead.
    return stream.filter(
        lambda batch: [len(t.strip()) >= config.min_chars for t in batch["text"]], batched=True
    )


@dataclass
class StreamingDocuments:
    train: IterableDataset  # cleaned training documents, all ranks' shards
    eval: Dataset  # a materialised held-out set
    tokenizer_sample: Dataset  # the first documents, for training the BPE


def stream_documents(config: DataConfig) -> StreamingDocuments:
    """The cleaned training stream, plus a small held-out set and a tokenizer sample read from it."""
    is_code = config.path is None and not config.sources
    mixed = _clean_stream(_mixed_stream(config), config, is_code)
    if config.eval_path:
        held_out_stream = _clean_stream(
            stream_source(config.eval_path, config, "data.eval_path"), config, is_code
        )
        train = mixed
    else:
        fraction = config.eval_fraction
        train = mixed.filter(
            lambda batch: [not is_held_out(t, fraction) for t in batch["text"]], batched=True
        )
        held_out_stream = mixed.filter(
            lambda batch: [is_held_out(t, fraction) for t in batch["text"]], batched=True
        )
    held_out = list(dict.fromkeys(r["text"] for r in islice(held_out_stream, config.streaming_eval_docs)))
    sample = list(dict.fromkeys(r["text"] for r in islice(train, config.tokenizer_docs)))
    if not held_out or not sample:
        raise ConfigError(
            "the streamed corpus gave no training or held-out documents: check data.path and data.min_chars"
        )
    log.info(
        "data: streaming; %d held-out documents kept, tokenizer sample of %d", len(held_out), len(sample)
    )
    return StreamingDocuments(
        train=train,
        eval=Dataset.from_dict({"text": held_out}),
        tokenizer_sample=Dataset.from_dict({"text": sample}),
    )


def sample_fingerprint(documents: Dataset) -> str:
    """A content key for an in-memory sample (its datasets fingerprint is not stable across runs)."""
    digest = hashlib.sha256()
    for text in documents["text"]:
        digest.update(content_hash(text).encode())
    return digest.hexdigest()[:16]


def rank_shard(documents: IterableDataset, rank: int, world_size: int) -> IterableDataset:
    """This rank's disjoint share of the training documents."""
    return split_dataset_by_node(documents, rank=rank, world_size=world_size)


@dataclass
class StreamSettings:
    batch: BatchSettings
    buffer_size: int
    dedup: bool
    seed: int
    rank: int


class BufferedBuckets(torch.utils.data.IterableDataset):
    """Endless batches of one rank: read documents, tokenize, fill a buffer, bucket it, emit in random order.

    Runs inside DataLoader workers, so tokenization stays off the training loop's thread. Every batch
    carries its worker's position: (epoch, buffer index, documents read before that buffer, batches of it
    emitted). Buffers start on document boundaries and each has its own RNG, so resuming from a position
    skips the documents before the buffer (counted and hashed, never tokenized), rebuilds that one
    buffer, and skips the batches already emitted: the batches that follow are the uninterrupted run's.
    """

    def __init__(self, documents: IterableDataset, tokenizer, settings: StreamSettings, pad_id: int) -> None:
        self.documents, self.tokenizer, self.settings, self.pad_id = documents, tokenizer, settings, pad_id
        self.start: dict[int, StreamPosition] = {}  # worker id -> position to resume from

    def _emit(self, buffer: list[list[int]], rng: np.random.Generator) -> Iterator[Batch]:
        batch_settings = self.settings.batch
        lengths = np.array([len(s) for s in buffer])
        if batch_settings.batching == "bucket":
            batches = length_buckets(lengths, batch_settings.max_tokens_per_batch, rng)
        else:
            batches = fixed_batches(len(buffer), batch_settings.micro_batch_size, rng)
        pad_to = batch_settings.max_seq_len if batch_settings.batching == "pad" else None
        for index in rng.permutation(len(batches)):
            rows = [buffer[i] for i in batches[index]]
            tensors = collate(rows, self.pad_id, pad_to)
            yield Batch(
                tensors,
                real_tokens=int(lengths[batches[index]].sum()),
                padded_tokens=tensors["input_ids"].numel(),
                sequences=len(rows),
                sum_sq_len=int((lengths[batches[index]] ** 2).sum()),
                local_targets=int((lengths[batches[index]] - 1).sum()),
            )

    def _sequences(self, texts: list[str]) -> list[list[int]]:
        eos, max_len = self.tokenizer.eos_token_id, self.settings.batch.max_seq_len
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [s for ids in encoded for s in split_into_sequences([*ids, eos], max_len)]

    def _buffers(self, skip_documents: int) -> Iterator[tuple[list[list[int]], int]]:
        """(buffer, documents read before it) of one pass over the shard, from `skip_documents` on."""
        seen: set[str] = set()  # exact duplicates, per epoch and per worker
        texts: list[str] = []
        buffer: list[list[int]] = []
        read = started_at = 0
        for record in self.documents:
            read += 1
            if self.settings.dedup:
                key = content_hash(record["text"])
                if key in seen:
                    continue
                seen.add(key)
            if read <= skip_documents:
                started_at = read
                continue
            texts.append(record["text"])
            if len(texts) == TOKENIZE_BATCH:
                buffer += self._sequences(texts)
                texts = []
            if len(buffer) >= self.settings.buffer_size:
                yield buffer, started_at
                buffer, started_at = [], read
        buffer += self._sequences(texts) if texts else []
        if buffer:
            yield buffer, started_at

    def _epoch(self, worker_id: int, epoch: int, start: StreamPosition | None) -> Iterator[Batch]:
        index, skip_documents, skip_batches = (
            (start.buffer, start.documents, start.batches) if start else (0, 0, 0)
        )
        for buffer, documents_before in self._buffers(skip_documents):
            rng = np.random.default_rng([self.settings.seed, self.settings.rank, worker_id, epoch, index])
            for emitted, batch in enumerate(self._emit(buffer, rng), start=1):
                if emitted > skip_batches:
                    position = StreamPosition(worker_id, epoch, index, documents_before, emitted)
                    yield replace(batch, stream_position=position)
            index, skip_batches = index + 1, 0

    def __iter__(self) -> Iterator[Batch]:
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker else 0
        start = self.start.get(worker_id)
        epoch = start.epoch if start else 0
        while True:
            emitted = False
            for batch in self._epoch(worker_id, epoch, start):
                emitted = True
                yield batch
            if not emitted and not start:
                raise ConfigError(
                    f"rank {self.settings.rank}'s share of the streamed corpus is empty: use fewer ranks or more data"
                )
            epoch, start = epoch + 1, None


class StreamingBatches:
    """This rank's endless training batches from a stream, through DataLoader workers, resumable.

    The state is each worker's position (see BufferedBuckets). With one worker (or none) a resumed
    run sees exactly the batches an uninterrupted one would; with several, each worker's sequence is
    exact but the round-robin between them restarts at worker 0, so their order within a round may
    rotate (no batch is skipped or repeated either way).
    """

    def __init__(self, documents: IterableDataset, tokenizer, settings: StreamSettings) -> None:
        self.dataset = BufferedBuckets(documents, tokenizer, settings, tokenizer.pad_token_id)
        self.num_workers = min(settings.batch.num_workers, max(1, documents.num_shards))
        self.positions: dict[int, StreamPosition] = {}

    def __iter__(self) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(
            self.dataset.settings.seed
        )  # keeps the global RNG untouched
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            worker_init_fn=ignore_stop_signals,
            generator=generator,
            pin_memory=torch.cuda.is_available(),
        )
        for batch in loader:
            self.positions[batch.stream_position.worker] = batch.stream_position
            yield replace(batch, stream_position=None)

    def state_dict(self) -> dict:
        return {
            "streaming": True,
            "num_workers": self.num_workers,
            "positions": {
                str(w): p.saved() for w, p in sorted({**self.dataset.start, **self.positions}.items())
            },
        }

    def load_state_dict(self, state: dict) -> bool:
        """Resume from `state`; False (the stream starts over) when it was written with other workers."""
        if state.get("num_workers") != self.num_workers or "positions" not in state:
            return False
        self.dataset.start = {
            int(w): StreamPosition.from_saved(int(w), p) for w, p in state["positions"].items()
        }
        return True
