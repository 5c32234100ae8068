"""The data pipeline: documents -> tokenizer -> cached token sequences."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from filelock import FileLock
from transformers import PreTrainedTokenizerBase

from lmscale.config import DataConfig
from lmscale.data.batches import tokenize_documents
from lmscale.data.sources import load_documents
from lmscale.data.tokenizer import local_tokenizer, trained_tokenizer
from lmscale.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: Dataset
    eval: Dataset
    tokenizer: PreTrainedTokenizerBase


def prepare_data(config: DataConfig, tokenizer_path: str | None = None) -> PreparedData:
    """Load, tokenize and cache the corpus.

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
    with FileLock(str(cache_dir / "prepare.lock")):
        train_docs, eval_docs = load_documents(
            config.path, config.text_field, config.eval_fraction, str(cache_dir)
        )
        tokenizer_dir = config.tokenizer or tokenizer_path
        if tokenizer_dir:
            tokenizer = local_tokenizer(tokenizer_dir)
        else:
            tokenizer = trained_tokenizer(train_docs, config.vocab_size, str(cache_dir))
        train = tokenize_documents(train_docs, tokenizer, config.max_seq_len)
        held_out = tokenize_documents(eval_docs, tokenizer, config.max_seq_len)
    if len(train) == 0 or len(held_out) == 0:
        raise ConfigError(f"data.path={config.path} gives no training or held-out sequences: add more text")
    log.info(
        "data: %d train / %d held-out sequences of <= %d tokens",
        len(train),
        len(held_out),
        config.max_seq_len,
    )
    return PreparedData(train=train, eval=held_out, tokenizer=tokenizer)
