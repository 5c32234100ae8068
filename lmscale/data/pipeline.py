"""The data pipeline: documents -> tokenizer -> cached token sequences, for training and held-out evaluation."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, IterableDataset
from filelock import FileLock
from transformers import PreTrainedTokenizerBase

from lmscale.config import DataConfig
from lmscale.data.cleaning import clean_documents
from lmscale.data.prompts import tokenize_prompts
from lmscale.data.remote import with_local_copies
from lmscale.data.sources import load_documents
from lmscale.data.streaming import rank_shard, sample_fingerprint, stream_documents
from lmscale.data.tasks import (
    TaskFormat,
    dataset_summary,
    ensure_chat_template,
    label_names,
    load_task_records,
    task_format,
    tokenize_records,
    tokenizer_text,
)
from lmscale.data.tokenize import tokenize_documents
from lmscale.data.tokenizer import local_tokenizer, trained_tokenizer
from lmscale.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: Dataset | IterableDataset  # an IterableDataset of this rank's shard when streaming
    eval: Dataset
    tokenizer: PreTrainedTokenizerBase
    labels: list[str] | None = None  # classification: class names in id order


def clean_splits(config: DataConfig, cache_dir: str) -> tuple[Dataset, Dataset]:
    """Loaded and cleaned (train, held-out) documents; an empty split is an error."""
    train_docs, eval_docs = load_documents(config, cache_dir)
    is_code = config.path is None and not config.sources  # the embedded stdlib corpus
    train_docs = clean_documents(train_docs, config, "train", is_code)
    eval_docs = clean_documents(eval_docs, config, "eval", is_code)
    for split, docs in (("training", train_docs), ("held-out", eval_docs)):
        if len(docs) == 0:
            raise ConfigError(
                f"the {split} data is empty after cleaning: check the data path, or lower data.min_chars / set data.clean=false"
            )
    return train_docs, eval_docs


def choose_tokenizer(
    config: DataConfig,
    tokenizer_path: str | None,
    train_docs: Dataset,
    cache_dir: str,
    corpus_key: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    """data.tokenizer, else the pretrained model's own, else a BPE trained on the training documents."""
    if config.tokenizer:
        return local_tokenizer(config.tokenizer, "data.tokenizer", trust_remote_code)
    if tokenizer_path:
        return local_tokenizer(tokenizer_path, "model.path", trust_remote_code)
    return trained_tokenizer(train_docs, config.vocab_size, cache_dir, corpus_key)


def prepare_streaming_data(
    config: DataConfig,
    tokenizer_path: str | None,
    cache_dir: Path,
    rank: int,
    world_size: int,
    trust_remote_code: bool,
) -> PreparedData:
    """The streaming pipeline: nothing is tokenized up front but the held-out set."""
    documents = stream_documents(config)
    with FileLock(str(cache_dir / "prepare.lock")):
        sample = documents.tokenizer_sample
        tokenizer = choose_tokenizer(
            config, tokenizer_path, sample, str(cache_dir), sample_fingerprint(sample), trust_remote_code
        )
    held_out = tokenize_documents(documents.eval, tokenizer, config.max_seq_len, 1, "eval")
    return PreparedData(
        train=rank_shard(documents.train, rank, world_size), eval=held_out, tokenizer=tokenizer
    )


def has_message_replies(records: Dataset, fmt: TaskFormat) -> bool:
    """Whether preference or unpaired records hold message lists (rendered with a chat template), not text."""
    reply = {"preference": "chosen", "unpaired": "completion", "prompt": "messages"}.get(fmt.name)
    return (
        reply is not None
        and len(records) > 0
        and reply in records.column_names
        and isinstance(records[0][reply], list)
    )


def prepare_task_data(
    config: DataConfig,
    fmt: TaskFormat,
    tokenizer_path: str | None,
    cache_dir: Path,
    trust_remote_code: bool,
    num_labels: int | None,
    completion_room: int = 0,
) -> PreparedData:
    """Fine-tuning records (instructions or labelled documents) as sequences with their loss targets; prompts
    (GRPO) as prompt ids leaving `completion_room` tokens for what is sampled."""
    with FileLock(str(cache_dir / "prepare.lock")):
        train_records, eval_records = load_task_records(config, fmt, str(cache_dir))
        corpus = None if (config.tokenizer or tokenizer_path) else tokenizer_text(train_records, fmt)
        tokenizer = choose_tokenizer(config, tokenizer_path, corpus, str(cache_dir), None, trust_remote_code)
        if fmt.name == "chat" or has_message_replies(train_records, fmt):
            ensure_chat_template(tokenizer)
        labels = label_names(train_records, num_labels) if fmt.name == "classification" else None
        if fmt.name == "prompt":
            train = tokenize_prompts(train_records, fmt, tokenizer, config, "train", completion_room)
            held_out = tokenize_prompts(eval_records, fmt, tokenizer, config, "eval", completion_room)
        else:
            train = tokenize_records(train_records, fmt, tokenizer, config, "train", labels)
            held_out = tokenize_records(eval_records, fmt, tokenizer, config, "eval", labels)
    log.info("data/%s: train %s; held-out %s", fmt.name, dataset_summary(train), dataset_summary(held_out))
    warn_if_small_held_out(len(held_out), "record(s)", config)
    return PreparedData(train=train, eval=held_out, tokenizer=tokenizer, labels=labels)


# Below this many held-out records or sequences, eval_loss moves by chance more than by learning.
SMALL_HELD_OUT = 20


def warn_if_small_held_out(count: int, unit: str, config: DataConfig) -> None:
    if count >= SMALL_HELD_OUT:
        return
    fix = (
        "add records to data.eval_path"
        if config.eval_path
        else "raise data.eval_fraction or set data.eval_path"
    )
    log.warning(
        "data: the held-out set has only %d %s: eval_loss and best-checkpoint choices will be noisy; %s",
        count,
        unit,
        fix,
    )


def prepare_data(
    config: DataConfig,
    tokenizer_path: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    trust_remote_code: bool = False,
    task: str = "causal_lm",
    num_labels: int | None = None,
    completion_room: int = 0,
) -> PreparedData:
    """Load, tokenize and cache the corpus; `tokenizer_path` (a pretrained model's directory) is used
    when `data.tokenizer` is unset; `trust_remote_code` lets a tokenizer directory run its own code;
    `task` and `data.format` choose fine-tuning records instead of documents.

    Every rank calls this before the process group exists; a file lock lets the first rank do the
    work while the others wait and then read the cache, so no rank sits in a collective with a timeout.
    """
    cache_dir = Path(config.cache_dir).expanduser()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"data.cache_dir={config.cache_dir} cannot be created ({exc.strerror}): choose a writable path"
        ) from None
    config = with_local_copies(config, cache_dir)  # data at URLs is read from its local copy
    fmt = task_format(config, task)
    if fmt is not None:
        return prepare_task_data(
            config, fmt, tokenizer_path, cache_dir, trust_remote_code, num_labels, completion_room
        )
    if config.streaming:
        return prepare_streaming_data(config, tokenizer_path, cache_dir, rank, world_size, trust_remote_code)
    with FileLock(str(cache_dir / "prepare.lock")):
        train_docs, eval_docs = clean_splits(config, str(cache_dir))
        tokenizer = choose_tokenizer(
            config, tokenizer_path, train_docs, str(cache_dir), trust_remote_code=trust_remote_code
        )
        train = tokenize_documents(train_docs, tokenizer, config.max_seq_len, config.num_proc, "train")
        held_out = tokenize_documents(eval_docs, tokenizer, config.max_seq_len, config.num_proc, "eval")
    if len(train) == 0 or len(held_out) == 0:
        raise ConfigError(f"data.path={config.path} gives no training or held-out sequences: add more text")
    log.info(
        "data: %d train / %d held-out sequences of <= %d tokens",
        len(train),
        len(held_out),
        config.max_seq_len,
    )
    warn_if_small_held_out(len(held_out), "sequence(s)", config)
    return PreparedData(train=train, eval=held_out, tokenizer=tokenizer)


def prepare_held_out(
    config: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    task: str = "causal_lm",
    labels: list[str] | None = None,
    completion_room: int = 0,
) -> Dataset:
    """Only the held-out split, tokenized with `tokenizer` (offline evaluation; nothing is trained); prompts
    leave `completion_room` tokens for the answer, as in training."""
    cache_dir = Path(config.cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    fmt = task_format(config, task)
    with FileLock(str(cache_dir / "prepare.lock")):
        if fmt is not None:
            _, eval_records = load_task_records(config, fmt, str(cache_dir))
            if fmt.name == "prompt":
                return tokenize_prompts(eval_records, fmt, tokenizer, config, "eval", completion_room)
            return tokenize_records(eval_records, fmt, tokenizer, config, "eval", labels)
        _, eval_docs = clean_splits(config, str(cache_dir))
        return tokenize_documents(eval_docs, tokenizer, config.max_seq_len, config.num_proc, "eval")
